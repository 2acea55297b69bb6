"""SugarCrepe-style compositional evaluation: for each (image, true caption, caption with one change),
is the true caption preferred? By embedding similarity, and with a reranker by its Yes-probability
(pointwise) or its choice between the two (listwise). A tie is a failure, as in the official code
(`score(pos) > score(neg)`).

Files (images relative to an image root), one per subset, named by its stem (`replace_att.json` ->
subset "replace_att", group "replace"):
- `.jsonl`, `.json` (a list) or `.parquet` records `{"image", "pos", "neg"}` (the synthetic world);
- SugarCrepe's own JSON: `{"0": {"filename", "caption", "negative_caption"}, ...}` (COCO val2017 images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unime_ray.data.mmeb import DataError, ReadState, string
from unime_ray.eval.groups import compositional_group
from unime_ray.eval.ranking import Collection, ItemIndex, Task, padded
from unime_ray.eval.retrieval import IMAGE_PROMPT, Records, load_records


def _sugarcrepe(document: dict, where: str) -> Records:
    out = []
    for key, rec in document.items():
        if not isinstance(rec, dict):
            raise DataError(f"{where}: entry {key!r}: expected an object")
        row = {
            "image": rec.get("filename"),
            "pos": rec.get("caption"),
            "neg": rec.get("negative_caption"),
        }
        out.append((f"{where}: entry {key!r}", row))
    return out


def read_compositional(
    path: str | Path, image_root: str | Path, allow_absolute_images: bool = False
) -> list[tuple[str, str, str]]:
    """[(image, true caption, altered caption)]; a missing field, or an image path the MMEB readers
    would quarantine (no file, leaving the root, absolute unless allowed), is a `DataError` naming the
    row; nothing outside the root is opened."""
    state = ReadState(image_root, check_images=False, allow_absolute=allow_absolute_images)
    rows = []
    for where, record in load_records(path, _sugarcrepe):
        image, pos, neg = (string(record, f, where, required=True) for f in ("image", "pos", "neg"))
        state.require_image(image, where)
        if not pos.strip() or not neg.strip():
            raise DataError(f"{where}: empty caption")
        rows.append((image, pos, neg))
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def compositional_collection(
    name: str, rows: list[tuple[str, str, str]], image_root: str | Path, image_prompt: str = IMAGE_PROMPT
) -> Collection:
    """One task: each image ranks [true, altered] (a row whose two captions are identical is a success:
    the two candidates are one)."""
    index = ItemIndex(image_root)
    queries = [index.add(image_prompt, image) for image, _, _ in rows]
    lists = [[index.add(pos, ""), index.add(neg, "")] for _, pos, neg in rows]
    positives = [np.flatnonzero(np.asarray(c) == c[0]) for c in lists]
    task = Task(name, np.asarray(queries), padded(lists), positives)
    info = {"rows": len(rows), "group": compositional_group(name)}
    return Collection("compositional", name, index.items, [task], info)


def load_compositional(
    path: str | Path, image_root: str | Path, image_prompt: str, allow_absolute_images: bool = False
) -> Collection:
    rows = read_compositional(path, image_root, allow_absolute_images)
    return compositional_collection(Path(path).stem, rows, image_root, image_prompt)
