"""Reading a corpus to index into records `{id, source, text, image}` (INDEX_RECORDS minus the vector).

`--corpus` names a data file or a folder of them (`.jsonl`, `.json`, `.parquet`); each file's format is
recognised from the fields of its first record:

- MMEB-train pairs (`qry`, `pos_text`, `pos_image_path`, ...): the positives are indexed.
- MMEB-eval (`qry_text`, `tgt_text`, `tgt_img_path`, ...): every target of every query.
- image + captions (`image`, `captions`; the synthetic world's `retrieval/captions.jsonl`, a
  Flickr30K / COCO split flattened to one row per image): the images, embedded with
  `index.image_prompt` (MMEB's image wording), the captions, or both (`index.items`).

A record's source is its file's stem; its id is the content hash the mining pool uses
(`candidate_id(source, text, image)`), so equal content is one record, and re-reading a grown corpus
gives its old records their old ids (which is how an incremental add finds what is new).

Rows are read by the MMEB readers' rules (the same parser and image checks): a file that cannot be read
raises `DataError` naming the file, the row and the field; an unusable row (missing, corrupt or
out-of-root image, empty caption) goes to the quarantine table with its reason, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from unime_ray.config import IndexConfig

# The MMEB readers' record parser, field checks and image policy, so a captions file follows exactly the
# rules (and error messages) of the MMEB files next to it.
from unime_ray.data.mmeb import (
    DATA_SUFFIXES,
    DataError,
    ReadResult,
    ReadState,
    load_records,
    read_file,
    string,
    strings,
)
from unime_ray.data.schemas import INDEX_RECORDS, QUARANTINE, candidate_id

CORPUS = pa.schema([f for f in INDEX_RECORDS if f.name != "embedding"])


def read_corpus(
    path: str | Path,
    image_root: str | Path,
    cfg: IndexConfig,
    check_images: bool = True,
    allow_absolute_images: bool = False,
) -> ReadResult:
    """Every record of the corpus at `path` (a file or a folder of files), once, in file then row order:
    records of equal content (so of equal id) are one, the first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file or folder")
    files = (
        sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
        if path.is_dir()
        else [path]
    )
    if not files:
        raise DataError(f"{path}: no data files ({', '.join('*' + s for s in DATA_SUFFIXES)})")
    state = ReadState(image_root, check_images, allow_absolute_images)
    read = ReadResult.concat([_read_file(f, state, cfg) for f in files])
    # Equal content in two rows or files is one record: keep its first occurrence.
    first: dict[str, int] = {}
    for row, rid in enumerate(read.table["id"].to_pylist()):
        first.setdefault(rid, row)
    return ReadResult(read.table.take(list(first.values())), read.quarantine)


def _read_file(path: Path, state: ReadState, cfg: IndexConfig) -> ReadResult:
    records = load_records(path)
    fields = set(records[0][1]) if records else set()
    if "captions" in fields:
        return _read_captions(path, records, state, cfg)
    if "tgt_text" in fields:
        read = read_file(path, "eval", None, _file_state(state))
        sides = [
            (r["dataset"], t, i)
            for r in read.table.to_pylist()
            for t, i in zip(r["tgt_text"], r["tgt_image"], strict=True)
        ]
    elif "pos_text" in fields:
        read = read_file(path, "pairs", None, _file_state(state))
        sides = [(r["dataset"], r["pos_text"], r["pos_image"]) for r in read.table.to_pylist()]
    elif records:
        raise DataError(
            f"{records[0][0]}: unknown corpus format (fields {sorted(fields)}); expected MMEB-train pairs "
            "(pos_text, ...), MMEB-eval (tgt_text, ...) or image + captions (image, captions)"
        )
    else:
        return ReadResult(CORPUS.empty_table(), QUARANTINE.empty_table())
    return ReadResult(_table([_record(*side) for side in sides]), read.quarantine)


def _file_state(state: ReadState) -> ReadState:
    """`state`'s image policy and verdicts with the explicit ids of one file only: the index keys
    records by content, so an MMEB `id` need only be unique within its file (as `read_pairs` reads it)."""
    state.seen_ids = set()
    return state


def _read_captions(
    path: Path, records: list[tuple[str, dict[str, Any]]], state: ReadState, cfg: IndexConfig
) -> ReadResult:
    source = path.stem
    kept: list[dict[str, str]] = []
    quarantined: list[dict[str, Any]] = []

    def quarantine(row: int, field: str, reason: str, rid: str) -> None:
        quarantined.append({"source": str(path), "row": row, "id": rid, "field": field, "reason": reason})

    for row, (where, record) in enumerate(records):
        image = string(record, "image", where, required=True)
        captions = strings(record, "captions", where)
        if cfg.items != "texts":
            image_record = _record(source, cfg.image_prompt, image)
            problem = state.image_problem(image)
            if problem is None:
                kept.append(image_record)
            else:
                quarantine(row, "image", problem, image_record["id"])
        if cfg.items != "images":
            for k, text in enumerate(captions):
                if text.strip():
                    kept.append(_record(source, text, ""))
                else:
                    quarantine(row, f"captions[{k}]", "empty_text", "")
    return ReadResult(_table(kept), pa.Table.from_pylist(quarantined, schema=QUARANTINE))


def _record(source: str, text: str, image: str) -> dict[str, str]:
    return {"id": candidate_id(source, text, image), "source": source, "text": text, "image": image}


def _table(records: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=CORPUS)
