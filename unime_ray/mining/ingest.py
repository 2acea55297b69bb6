"""Ingest stage: validated MMEB-train pairs -> the queries and each dataset's candidate pool.

The pool of a dataset is the set of its distinct positives (text, image), each once (the paper's
"global" candidates): MMEB repeats positives heavily (classification labels, shared captions), and
embedding and judging a duplicate twice would be waste. A candidate's id is a content hash
(`candidate_id`), so it is the same in every run; a query's `pos_id` points at its positive in the pool.

Each data file (one dataset) is read and validated by one Ray task, which writes its part of the three
outputs; the driver then checks ids across files and concatenates the parts by streaming, so no process
holds more than one file's rows. Ids must be unique across files, as `read_folder` requires: a file
holding an id of an earlier file is read again with those ids marked as seen, and its rows with them
are quarantined as `duplicate_id`, exactly as one sequential read would.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.config import DataConfig
from unime_ray.data.mmeb import ReadState, data_files, read_file
from unime_ray.data.schemas import POOL, QUARANTINE, QUERIES, candidate_id
from unime_ray.engine.tasks import run_tasks
from unime_ray.io import PART_ROWS, atomic_path, merge_sorted, write_parquet


def _ingest_file(
    path: Path, dataset: str, data: DataConfig, seen: pa.Array | None, parts: Path
) -> dict[str, int]:
    """One Ray task: read one dataset's file and write its queries, pool (sorted by id) and quarantine
    parts; `seen` are ids of earlier files (a second read after a collision). Returns the read counts."""
    state = ReadState(data.image_root, data.check_images, data.allow_absolute_images)
    if seen is not None:
        state.seen_ids.update(seen.to_pylist())
    read = read_file(path, "pairs", dataset, state)
    pairs = read.table
    pos_ids = pa.array(
        [
            candidate_id(d, t, i)
            for d, t, i in zip(
                *(pairs[c].to_pylist() for c in ("dataset", "pos_text", "pos_image")), strict=True
            )
        ],
        pa.string(),
    )
    queries = pa.table(
        [pairs["id"], pairs["dataset"], pairs["qry_text"], pairs["qry_image"], pos_ids], schema=QUERIES
    )
    candidates = pa.table([pos_ids, pairs["dataset"], pairs["pos_text"], pairs["pos_image"]], schema=POOL)
    first = candidates.append_column("_row", pa.array(range(candidates.num_rows), pa.int64()))
    first = first.group_by("id", use_threads=False).aggregate([("_row", "min")])["_row_min"]
    write_parquet(queries, parts / f"{dataset}.queries.parquet")
    write_parquet(candidates.take(first).sort_by("id"), parts / f"{dataset}.pool.parquet", PART_ROWS)
    write_parquet(read.quarantine, parts / f"{dataset}.quarantine.parquet")
    return read.counts()


def _concat(parts: list[Path], schema: pa.Schema, out: Path) -> None:
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                writer.write_batch(batch)


def run_ingest(data: DataConfig, out_dir: Path) -> dict:
    files = data_files(data.train_dir, data.datasets or None)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    todo = [(path, name, data, None, parts) for name, path in files.items()]
    counts: dict[str, dict[str, int]] = {}
    for i, read_counts, _ in run_tasks(_ingest_file, todo):
        counts[todo[i][1]] = read_counts

    # Ids across files: every id a file holds (kept or quarantined), in file order.
    names = list(files)
    ids = [
        pa.concat_arrays(
            [
                pq.read_table(parts / f"{name}.{kind}.parquet", columns=["id"])["id"].combine_chunks()
                for kind in ("queries", "quarantine")
            ]
        )
        for name in names
    ]
    for n, name in enumerate(names[1:], start=1):
        earlier = pa.concat_arrays(ids[:n])
        if pc.any(pc.is_in(ids[n], value_set=earlier)).as_py():
            _, counts[name], _ = next(run_tasks(_ingest_file, [(files[name], name, data, earlier, parts)]))

    _concat([parts / f"{name}.queries.parquet" for name in names], QUERIES, out_dir / "queries.parquet")
    _concat(
        [parts / f"{name}.quarantine.parquet" for name in names], QUARANTINE, out_dir / "quarantine.parquet"
    )
    merge_sorted([parts / f"{name}.pool.parquet" for name in names], "id", out_dir / "pool.parquet", POOL)
    per_dataset = {
        name: {
            "queries": pq.read_metadata(parts / f"{name}.queries.parquet").num_rows,
            "pool": pq.read_metadata(parts / f"{name}.pool.parquet").num_rows,
        }
        for name in sorted(names)
    }
    shutil.rmtree(parts)
    read: Counter = Counter()
    for read_counts in counts.values():
        read.update(read_counts)
    return {
        "read": dict(read),
        "queries": sum(d["queries"] for d in per_dataset.values()),
        "pool": sum(d["pool"] for d in per_dataset.values()),
        "datasets": per_dataset,
    }
