"""Image-text retrieval over the full test gallery, both directions (Flickr30K, COCO, ShareGPT4V,
Urban1K): Recall@k of image -> text (an image is right when ANY of its captions is within the top k) and
text -> image.

Files read (images relative to an image root):
- `.jsonl`, `.json` (a list) or `.parquet` records `{"image": path, "captions": [str, ...]}` (or
  `"caption": str`, the one long caption of ShareGPT4V / Urban1K);
- a Karpathy split file (`dataset_flickr30k.json`, `dataset_coco.json`): `{"images": [{"filepath"?,
  "filename", "split", "sentences": [{"raw"}]}]}`, keeping the images of one split (default "test").

As in the official evaluation, an image is embedded with the instruction "<|image_1|> Find an image
caption describing the given image." and a caption as itself, and at most 5 captions per image are
kept (COCO has a few images with 6-7). Rows naming the same image are merged; an exact duplicate caption
is one gallery entry that is correct for every image carrying it, and one text query with all those
images correct — never a distractor identical to the right answer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unime_ray.data import mmeb
from unime_ray.data.mmeb import DataError, ReadState, parse_json, string, strings
from unime_ray.eval.groups import retrieval_kind
from unime_ray.eval.ranking import Collection, ItemIndex, Task

IMAGE_PROMPT = "<|image_1|> Find an image caption describing the given image."
Records = list[tuple[str, dict[str, Any]]]


def load_records(path: str | Path, from_mapping: Callable[[dict, str], Records]) -> Records:
    """Records of a `.jsonl` / `.parquet` / JSON-list file (the MMEB readers' loader, same errors), or
    of a JSON object file through `from_mapping(document, path)` (a benchmark's native layout)."""
    path = Path(path)
    if path.suffix == ".json":
        document = parse_json(path.read_text(encoding="utf-8"), str(path))
        if isinstance(document, dict):
            return from_mapping(document, str(path))
    return mmeb.load_records(path)


def _karpathy(split: str) -> Callable[[dict, str], Records]:
    def convert(document: dict, where: str) -> Records:
        if not isinstance(document.get("images"), list):
            raise DataError(f"{where}: a JSON object must be a Karpathy split file with an 'images' list")
        out = []
        for i, img in enumerate(document["images"]):
            if img.get("split") != split:
                continue
            name = str(Path(img.get("filepath", "")) / img["filename"])
            out.append(
                (f"{where}: images[{i}]", {"image": name, "captions": [s["raw"] for s in img["sentences"]]})
            )
        if not out:
            raise DataError(f"{where}: no image of split {split!r}")
        return out

    return convert


def read_captions(
    path: str | Path,
    image_root: str | Path,
    *,
    split: str = "test",
    max_captions: int = 5,
    allow_absolute_images: bool = False,
) -> list[tuple[str, list[str]]]:
    """[(image, captions)] in file order, rows of one image merged, at most `max_captions` each (0: all).
    A missing field, an image with no caption, or an image path the MMEB readers would quarantine (no
    file, leaving the root, absolute unless allowed) is a `DataError` naming the row; nothing outside
    the root is opened."""
    state = ReadState(image_root, check_images=False, allow_absolute=allow_absolute_images)
    merged: dict[str, list[str]] = {}
    for where, record in load_records(path, _karpathy(split)):
        image = string(record, "image", where, required=True)
        if "captions" in record:
            captions = strings(record, "captions", where)
        else:
            captions = [string(record, "caption", where, required=True)]
        state.require_image(image, where)
        if not captions or not all(c.strip() for c in captions):
            raise DataError(f"{where}: field 'captions': empty")
        kept = merged.setdefault(image, [])
        kept += [c for c in dict.fromkeys(captions) if c not in kept]
    if not merged:
        raise DataError(f"{path}: no records")
    return [(image, caps[:max_captions] if max_captions else caps) for image, caps in merged.items()]


def retrieval_collection(
    name: str,
    pairs: list[tuple[str, list[str]]],
    image_root: str | Path,
    image_prompt: str = IMAGE_PROMPT,
    caption_prompt: str = "",
) -> Collection:
    """Tasks "i2t" (each image ranks every distinct caption) and "t2i" (each distinct caption ranks
    every image)."""
    index = ItemIndex(image_root)
    images = [index.add(image_prompt, image) for image, _ in pairs]
    caption_ids = [[index.add(caption_prompt + c, "") for c in caps] for _, caps in pairs]
    gallery = list(dict.fromkeys(i for ids in caption_ids for i in ids))
    where = {item: pos for pos, item in enumerate(gallery)}
    owners: dict[int, list[int]] = {}
    for image_pos, ids in enumerate(caption_ids):
        for i in ids:
            owners.setdefault(i, []).append(image_pos)
    i2t = Task(
        "i2t",
        np.asarray(images),
        np.asarray(gallery),
        [np.asarray(sorted({where[i] for i in ids})) for ids in caption_ids],
    )
    t2i = Task("t2i", np.asarray(gallery), np.asarray(images), [np.asarray(owners[i]) for i in gallery])
    info = {"images": len(images), "captions": len(gallery), "kind": retrieval_kind(name)}
    return Collection("retrieval", name, index.items, [i2t, t2i], info)


def load_retrieval(
    path: str | Path,
    image_root: str | Path,
    *,
    split: str,
    max_captions: int,
    image_prompt: str,
    caption_prompt: str,
    allow_absolute_images: bool = False,
) -> Collection:
    """The collection of one retrieval file, named by its stem."""
    pairs = read_captions(
        path, image_root, split=split, max_captions=max_captions, allow_absolute_images=allow_absolute_images
    )
    return retrieval_collection(Path(path).stem, pairs, image_root, image_prompt, caption_prompt)
