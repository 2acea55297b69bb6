"""Resumable sharded processing on Ray Data: the unit of work and of resume is a request shard file.

    requests/shard-00007.parquet --(Ray Data actor pool)--> results/shard-00007.parquet

All pending shards stream through ONE Ray Data pipeline (actors start once, not once per shard). The
driver collects the output rows of each shard and writes the shard's result file atomically the moment
all of its rows are in, so a job killed at any point keeps every finished shard and a rerun processes
only the shards without a result file. A shard is complete only when its result holds exactly the
request's rows (deduplicated by key, in case a retried task delivers a row twice): every row exactly once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from unime_ray.io import finished_parquet, write_parquet, write_text

PATH_COL = "path"


def group_starts(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The row at which each run of equal consecutive `values` starts (empty for no rows). Compared in
    Arrow: a NumPy array of string ids would be one Python object per row."""
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    changed = pc.not_equal(values.slice(1), values.slice(0, len(values) - 1))
    return np.flatnonzero(np.r_[True, changed.to_numpy()])


def write_request_shards(
    table: pa.Table,
    out_dir: Path,
    per_shard: int,
    prefix: str = "shard",
    group: str | None = None,
    fill: Callable[[pa.Table], pa.Table] | None = None,
    first: int = 0,
) -> list[Path]:
    """Split `table` (already in processing order) into request files of `per_shard` rows, or, with
    `group`, of `per_shard` consecutive groups (a group, e.g. one query's judge calls, never straddles
    two shards). `fill` completes each shard's rows before it is written (e.g. joins the texts), so only
    one shard at a time holds them. Files are numbered from `first`, so that a table written in parts
    (each a whole number of shards) gets the names it would get whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if group is None:
        starts = list(range(0, table.num_rows, per_shard))
    else:
        starts = [int(i) for i in group_starts(table[group])[::per_shard]]
    bounds = starts + [table.num_rows]
    return [
        write_parquet((fill or (lambda t: t))(table.slice(a, b - a)), out_dir / f"{prefix}-{i:05d}.parquet")
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), start=first)
    ]


def requests_once(out_dir: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Request shards are written once per stage: a `_COMPLETE` marker says the set is whole (a kill while
    writing them leaves no marker, and the set is written again from scratch)."""
    marker = out_dir / "_COMPLETE"
    if marker.is_file():
        return [out_dir / name for name in marker.read_text().split()]
    for stale in out_dir.glob("*.parquet"):
        stale.unlink()
    paths = write(out_dir)
    write_text("\n".join(p.name for p in paths) + "\n", marker)  # atomic: a cut-short list is never read
    return paths


def _dedupe(table: pa.Table, key: list[str]) -> pa.Table:
    """First occurrence of each key, in arrival order."""
    if table.num_rows == 0:
        return table
    indexed = table.append_column("_i", pa.array(range(table.num_rows)))
    first = indexed.group_by(key).aggregate([("_i", "min")])["_i_min"]
    return table.take(np.sort(first.to_numpy()))


def _read_shards(batch: pa.Table) -> pa.Table:
    """The request rows of the shard files a block names, each row with its file in PATH_COL."""
    tables = []
    for path in batch[PATH_COL].to_pylist():
        table = pq.read_table(path)
        tables.append(table.append_column(PATH_COL, pa.array([path] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def run_shards(
    requests: list[Path],
    out_dir: Path,
    transform: Callable[[ray.data.Dataset], ray.data.Dataset],
    schema: pa.Schema,
    key: list[str],
    label: str,
) -> dict:
    """Process every request shard without a result in `out_dir`; return counts.

    `transform` maps the request dataset (plus a `path` column it must keep) to result rows carrying the
    columns of `schema`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = [p for p in requests if not finished_parquet(out_dir / p.name)]
    report = {"shards": len(requests), "shards_done_before": len(requests) - len(pending), "rows": 0}
    expected = {p.name: pq.ParquetFile(p).metadata.num_rows for p in pending}
    for name in [n for n, rows in expected.items() if rows == 0]:
        write_parquet(schema.empty_table(), out_dir / name)
        expected.pop(name)
    if not expected:
        return report
    files = [str(p) for p in pending if p.name in expected]
    # One block per shard file: shards then finish one after another instead of in bulk at the end, and
    # every actor of a pool gets work. Not read_parquet: Ray 2.60's datasource V2 groups files into read
    # tasks of at least DataContext.target_min_block_size (1 MiB) before honouring override_num_blocks,
    # so small shards all came out as one block, processed by one actor, written at the very end.
    ds = ray.data.from_items([{PATH_COL: f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(_read_shards, batch_size=None, batch_format="pyarrow")
    buffers: dict[str, list[pa.Table]] = {name: [] for name in expected}
    counts = dict.fromkeys(expected, 0)
    start, done_rows = time.perf_counter(), 0
    for batch in transform(ds).iter_batches(batch_format="pyarrow", batch_size=None):
        names = [os.path.basename(p) for p in batch[PATH_COL].to_pylist()]
        for name in set(names):
            rows = [i for i, n in enumerate(names) if n == name]
            part = batch.take(rows).drop_columns([PATH_COL]).select(schema.names).cast(schema)
            buffers[name].append(part)
            counts[name] += part.num_rows
            if counts[name] < expected[name]:
                continue
            table = _dedupe(pa.concat_tables(buffers[name]), key)
            buffers[name], counts[name] = [table], table.num_rows
            if table.num_rows == expected[name]:
                write_parquet(table, out_dir / name)
                buffers.pop(name)
                done_rows += table.num_rows
                rate = done_rows / (time.perf_counter() - start)
                print(
                    f"[{label}] shard {name} done: {done_rows} rows this run, {rate:.1f} rows/s", flush=True
                )
    if buffers:
        missing = {n: expected[n] - counts[n] for n in buffers}
        raise RuntimeError(
            f"[{label}] shards incomplete after the pipeline finished (missing rows): {missing}"
        )
    report["rows"] = done_rows
    report["rows_per_s"] = done_rows / max(time.perf_counter() - start, 1e-9)
    return report
