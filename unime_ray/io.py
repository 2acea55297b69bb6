"""Atomic output: every file is written to a temporary name in the same folder, then renamed, so a
killed job leaves either the old file or the new one, never half of one. Also `merge_sorted`, which
joins the sorted part files of parallel tasks into one sorted file without holding them in memory,
and `digest`, the short content hash that names caches and fingerprints finished stages, with the file
identities (`file_sha256`, `file_stamp`, `weight_stamps`) that such fingerprints hold.

A full disk: a write that fails with ENOSPC raises `DiskFullError` naming the file, the bytes it needed
and the bytes free, and leaves nothing under the file's name (the temporary file is removed, which also
gives its space back); `disk_full` finds such an error however a stage wrapped it (a Ray task's error,
a chained exception), so a command can stop with that one line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
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


class DiskFullError(OSError):
    """ENOSPC while writing a file; its message names the file, the bytes needed and the bytes free.
    An OSError with errno ENOSPC, so handlers of OSError still see it; it pickles (a Ray task's error
    reaches the driver whole)."""

    def __init__(self, message: str, filename: str) -> None:
        super().__init__(errno.ENOSPC, message, filename)

    def __reduce__(self) -> tuple:
        return type(self), (self.strerror, self.filename)

    def __str__(self) -> str:
        return self.strerror


def _is_enospc(e: BaseException) -> bool:
    """An error for a full device: errno ENOSPC, or the C library's text for it in the message (some of
    Arrow's OSErrors carry the errno only there; FAISS raises a RuntimeError with it)."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def _enospc_line(e: BaseException) -> str:
    """The one line of an error's text that says the device is full: an error gathered from elsewhere
    (Ray Train's worker failures) carries whole tracebacks, the console gets the line that matters."""
    lines = [line.strip() for line in str(e).splitlines() if "No space left on device" in line]
    return lines[-1] if lines else str(e)


def _full_error(path: Path, written: int, needs: str) -> DiskFullError:
    """The DiskFullError of a write of `path` that failed after `written` bytes reached its temporary
    file: the bytes needed (the caller's `needs`, else at least `written`) and the bytes free now."""
    need = needs or f"more than the {written:,} bytes written before the device filled (size unknown)"
    return DiskFullError(
        f"{path}: no space left on the device writing it: it needed {need}{_free(path)}", str(path)
    )


def _free(path: Path, partial: str = "Nothing partial was kept") -> str:
    """What to say of the free space where `path` is, of what the write left, and what to do."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    return (
        f", {shutil.disk_usage(folder).free:,} bytes are free there. {partial}: "
        "free space and rerun the same command; finished work is not redone"
    )


def disk_full(e: BaseException, where: str | Path) -> DiskFullError | None:
    """The disk-full error behind `e`, or None: `e` itself, the cause of a Ray task's error, or any
    exception it was raised from or while handling. The DiskFullError raised, if one was (it names the
    file and the bytes); else, for the ENOSPC of a write that did not go through `atomic_path`, one that
    names its file if the error did (else the folder `where`) and says that the bytes are unknown."""
    seen, todo, raw = set(), [e], None
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        # A Ray task's error is an instance of its cause's class too, its text the whole traceback: the
        # cause is the error to report.
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException):
            if isinstance(err, DiskFullError):
                return err
            if raw is None and _is_enospc(err):
                raw = err
        todo += [cause, err.__cause__, err.__context__]
    if raw is None:
        return None
    path = Path(getattr(raw, "filename", None) or where)
    said = getattr(raw, "strerror", None) or _enospc_line(raw)
    # A write outside `atomic_path` (e.g. Ray Train copying a checkpoint) may leave a partial file or
    # folder; the stages never take one as finished (a checkpoint counts once Ray Train registered it).
    left = "A partial file it left is never taken as finished"
    message = (
        f"{path}: no space left on the device ({said}); the bytes it needed are not known{_free(path, left)}"
    )
    return DiskFullError(message, str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path, needs: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.
    A full device raises DiskFullError; `needs` says the bytes the file needs when the caller knows
    them, or how it estimates them (e.g. "12,345 bytes")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e, DiskFullError) or not _is_enospc(e):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # first, so that the free bytes said count its space as given back
        raise _full_error(path, written, needs) from e
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


def parquet_datasets(path: str | Path) -> tuple[str, ...]:
    """The values of the `dataset` column of a Parquet file, from its statistics when one value spans
    every row group (a stage's per-dataset files: nothing is read), else from the column itself."""
    meta = pq.ParquetFile(path).metadata
    column = meta.schema.names.index("dataset") if "dataset" in meta.schema.names else -1
    values = set()
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(column).statistics if column >= 0 else None
        if stats is None or not stats.has_min_max or stats.min != stats.max:
            table = pq.read_table(path, columns=["dataset"])
            return tuple(sorted(pc.unique(table["dataset"].drop_null()).to_pylist()))
        values.add(stats.min)
    return tuple(sorted(values))


def write_parquet(table: pa.Table, path: str | Path, row_group_size: int | None = None) -> Path:
    """`table` as a Parquet file, atomically. On a full disk, the bytes needed are estimated by the
    table's size in memory (the encoded file is usually smaller), and the error says so."""
    needs = f"about {table.nbytes:,} bytes (the table's size in memory; its Parquet file is usually smaller)"
    with atomic_path(path, needs) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """`text` as a UTF-8 file, atomically (a small marker file that a full disk cut short would otherwise
    be read on resume as a whole one)."""
    data = text.encode()
    with atomic_path(path, f"{len(data):,} bytes") as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def parquet_batches(
    path: str | Path, batch_size: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file as batches of at most `batch_size` rows, read one row group at a time.
    Not `ParquetFile.iter_batches` over the whole file: its reader keeps what it decoded for as long as
    the file object lives, so a long-lived stream held a whole file's worth (docs/benchmarks.md, the 6.6M
    run), while a read per row group frees each group once its batches are dropped."""
    file = pq.ParquetFile(path)
    for group in range(file.metadata.num_row_groups):
        yield from file.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)


class _Stream:
    """Rows of a sorted part file taken from its front, n at a time."""

    def __init__(self, path: Path) -> None:
        self.batches = parquet_batches(path, PART_ROWS)
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
    needs = f"about {sum(p.stat().st_size for p in parts):,} bytes (the sum of its parts' sizes)"
    with atomic_path(out, needs) as tmp, pq.ParquetWriter(tmp, schema) as writer:
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
