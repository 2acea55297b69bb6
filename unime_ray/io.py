"""Atomic output: every file is written to a temporary name in the same folder, then renamed, so a
killed job leaves either the old file or the new one, never half of one. Also `merge_sorted`, which
joins the sorted part files of parallel tasks into one sorted file without holding them in memory,
and `digest`, the short content hash that names caches and fingerprints finished stages, with the file
identities (`file_sha256`, `file_stamp`, `weight_stamps`) that such fingerprints hold."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MERGE_ROWS = 8192  # rows per chunk of a streaming merge
PART_ROWS = 1024  # row group size of the part files a merge reads: a merge holds one group per part
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")  # the files of a model folder that hold its weights


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as canonical JSON (keys sorted): equal for equal settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks (memory stays bounded for a multi-GB file): equal for
    equal contents, whatever the path or modification time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path) -> list[int]:
    """[size, mtime_ns] of a file: a file rewritten in place changes it (its path alone would not), and
    stamping is instant even for a 15 GB weight file. Not its contents: see `file_sha256` for that."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def weight_stamps(*folders: str | Path | None) -> list[list]:
    """[path, size, mtime_ns] of every weight file in the given model / adapter folders (None skipped):
    weights retrained into the same folder change the stamps."""
    stamps = []
    for folder in filter(None, folders):
        for f in sorted(Path(folder).iterdir()):
            if f.name.endswith(WEIGHT_SUFFIXES):
                stamps.append([str(f.resolve()), *file_stamp(f)])
    return stamps


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def finished_parquet(path: str | Path) -> bool:
    """Whether a stage output found on resume counts as done: the file exists and its Parquet footer
    reads. Atomic writes never leave a partial file, but a copy cut short or a damaged disk can; such a
    file is removed (said on stderr) so the stage redoes that shard instead of failing on it later."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        pq.read_metadata(path)
        return True
    except (pa.ArrowInvalid, OSError) as e:
        print(f"{path}: unreadable ({e}); removed, its shard is redone", file=sys.stderr, flush=True)
        path.unlink()
        return False


def write_parquet(table: pa.Table, path: str | Path, row_group_size: int | None = None) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(path)


class _Stream:
    """Rows of a sorted part file taken from its front, n at a time."""

    def __init__(self, path: Path) -> None:
        self.batches = pq.ParquetFile(path).iter_batches(batch_size=PART_ROWS)
        self.buffer = pa.table({})

    def take(self, n: int) -> pa.Table:
        parts, have = [], 0
        while have < n:
            if self.buffer.num_rows == 0:
                self.buffer = pa.Table.from_batches([next(self.batches)])
            part = self.buffer.slice(0, n - have)
            self.buffer = self.buffer.slice(part.num_rows)
            parts.append(part)
            have += part.num_rows
        return pa.concat_tables(parts)


def merge_order(parts: list[Path], key: str) -> np.ndarray:
    """For Parquet files each sorted by the unique `key`: the part each row of their merge comes from, in
    the merged order (only the keys are read)."""
    if not parts:
        return np.zeros(0, dtype=np.int32)
    keys = pa.concat_tables(
        [
            pq.read_table(p, columns=[key]).append_column(
                "_part", pa.repeat(pa.scalar(i, pa.int32()), pq.read_metadata(p).num_rows)
            )
            for i, p in enumerate(parts)
        ]
    )
    return keys["_part"].take(pc.sort_indices(keys, [(key, "ascending")])).to_numpy()


def merge_sorted(
    parts: list[Path], key: str, out: Path, schema: pa.Schema, order: np.ndarray | None = None
) -> int:
    """Merge Parquet files each sorted by the unique `key` into one file sorted by it, streaming: only
    the keys of all parts, one chunk of MERGE_ROWS rows and one row group per part are in memory at
    once, so write the parts with `row_group_size=PART_ROWS`. `order` is `merge_order(parts, key)` when
    the caller has it already. Returns rows written."""
    if not parts:
        write_parquet(schema.empty_table(), out)
        return 0
    labels = merge_order(parts, key) if order is None else order
    streams = [_Stream(p) for p in parts]
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(labels), MERGE_ROWS):
            chunk = labels[start : start + MERGE_ROWS]
            counts = np.bincount(chunk, minlength=len(parts))
            taken = pa.concat_tables([streams[i].take(int(n)) for i, n in enumerate(counts) if n])
            # The j-th row of part i in this chunk sits at offset[i] + j of `taken`.
            offsets = np.r_[0, np.cumsum(counts[counts > 0])][:-1]
            position = np.empty(len(chunk), dtype=np.int64)
            for i, offset in zip(np.flatnonzero(counts), offsets, strict=True):
                where = np.flatnonzero(chunk == i)
                position[where] = offset + np.arange(len(where))
            writer.write_table(taken.take(position).cast(schema))
    return len(labels)
