"""Embed stage of mining: every query and every pool candidate once, as EMBEDDINGS shards in `results/`.

Two backends (`embedder.backend`):

- `model`: the records stream through an actor pool of embedders on Ray Data (`engine.embed`), in
  request shards of `embed_shard_rows` items, the unit of resume (`engine.shards`).
- `precomputed`: bring your own embeddings, e.g. from a VLM2Vec run: a Parquet file with `id` and
  `embedding` (a list of floats). It is validated before any work: every query and pool id present
  exactly once, non-null ids; then Ray tasks, each over a range of the file's row groups, check that
  every vector has the file's dimension and finite, non-zero values, normalize it to unit length
  (counted in `normalized` when its norm was off by more than 1e-4), attach its dataset and kind, and
  write one part file each, sorted by dataset and id, so retrieve reads one dataset's row groups only.
  Rows whose id is neither a query nor a pool item are counted (`unused`), not written. JSONL is
  refused: at MMEB's size it is gigabytes of text to parse, and Parquet is one `to_parquet` away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from unime_ray.config import EmbedderConfig, MiningConfig
from unime_ray.data.mmeb import DataError
from unime_ray.data.schemas import EMBEDDINGS, USER_EMBEDDINGS, check_parquet_types, parquet_errors
from unime_ray.engine.embed import embed_dataset, embeddings_table
from unime_ray.engine.lookup import rows_named
from unime_ray.engine.shards import PATH_COL, requests_once, run_shards, write_request_shards
from unime_ray.engine.tasks import run_tasks
from unime_ray.io import finished_parquet, write_parquet

IMPORT_ROWS = 65536  # user rows per import task (whole row groups, so at least one row group)
NORM_TOLERANCE = 1e-4


def _items(queries: str | Path, pool: str | Path, columns: list[str]) -> pa.Table:
    """Queries then pool candidates with a `kind` column: what the stage embeds, in that order."""
    return pa.concat_tables(
        [
            pq.read_table(path, columns=columns).append_column(
                "kind", pa.repeat(pa.scalar(kind), pq.read_metadata(path).num_rows)
            )
            for path, kind in ((queries, "query"), (pool, "candidate"))
        ]
    )


def run_embed(
    queries: str | Path,
    pool: str | Path,
    out_dir: Path,
    model: EmbedderConfig,
    image_root: str,
    cfg: MiningConfig,
) -> dict:
    """Embed the items of the QUERIES and POOL files `queries` and `pool` into `out_dir/results`."""
    if model.backend == "precomputed":
        return import_embeddings(model.embeddings_path, queries, pool, out_dir / "results")
    items = _items(queries, pool, ["id", "dataset", "text", "image"])
    requests = requests_once(
        out_dir / "requests", lambda d: write_request_shards(items, d, cfg.embed_shard_rows)
    )

    def transform(ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = embed_dataset(
            ds,
            model,
            image_root,
            num_actors=cfg.num_actors,
            gpus_per_actor=cfg.gpus_per_actor,
            whole_blocks=True,  # one shard per call: the same vectors whatever was done before a resume
        )
        columns = ("id", "dataset", "kind", PATH_COL)
        return ds.map_batches(embeddings_table, fn_kwargs={"columns": columns}, batch_format="numpy")

    return run_shards(requests, out_dir / "results", transform, EMBEDDINGS, ["id", "kind"], "embed")


def _check_ids(path: str, items: pa.Table) -> int:
    """Every item's id in the user's file exactly once; return the number of rows the file has beyond."""
    with parquet_errors(path):
        ids = pq.read_table(path, columns=["id"])["id"]
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise DataError(f"{path}: row {row}: field 'id' is null")
    counts = pc.value_counts(ids).flatten()
    dup = pc.filter(counts[0], pc.greater(counts[1], 1))
    if len(dup):
        raise DataError(f"{path}: id {dup[0].as_py()!r} appears more than once")
    absent = items.filter(pc.invert(pc.is_in(items["id"], value_set=ids)))
    if absent.num_rows:
        first = absent.slice(0, 1).to_pylist()[0]
        raise DataError(
            f"{path}: no embedding for {first['kind']} {first['id']!r} of dataset {first['dataset']!r} "
            f"({absent.num_rows} ids missing in all)"
        )
    return len(ids) - items.num_rows


def _first_dim(path: str) -> int:
    with parquet_errors(path):
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=["embedding"]))
    value = batch["embedding"][0]
    if not value.is_valid:
        raise DataError(f"{path}: row 0: field 'embedding' is null")
    return len(value)


def _import_part(path: str, row_groups: list[int], first_row: int, items: pa.Table, dim: int, out: Path):
    """One import task: the rows of `row_groups` (the first is file row `first_row`) -> a part file."""
    with parquet_errors(path):
        table = pq.ParquetFile(path).read_row_groups(row_groups, columns=["id", "embedding"])
    lengths = pc.fill_null(pc.list_value_length(table["embedding"]), -1).to_numpy()
    bad = np.flatnonzero(lengths != dim)
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: row {first_row + row}: field 'embedding' of {table['id'][row].as_py()!r} has "
            f"dimension {lengths[row]} (null = -1), expected {dim}"
        )
    matrix = pc.list_flatten(table["embedding"]).to_numpy().astype(np.float32).reshape(-1, dim)
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1) | (norms == 0) | ~np.isfinite(norms))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: row {first_row + row}: field 'embedding' of {table['id'][row].as_py()!r} is not "
            "finite or is all zeros"
        )
    named = rows_named(items, "id", table["id"])  # not all the run's items: engine/lookup.py
    where = pc.index_in(table["id"], value_set=named["id"])
    known = pc.is_valid(where).to_numpy(zero_copy_only=False)
    rows = where.drop_null()
    unit = (matrix[known] / norms[known, None]).astype(np.float32)
    part = pa.table(
        {
            "id": table["id"].filter(known),
            "dataset": named["dataset"].take(rows),
            "kind": named["kind"].take(rows),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1)), dim).cast(
                pa.list_(pa.float32())
            ),
        },
        schema=EMBEDDINGS,
    ).sort_by([("dataset", "ascending"), ("id", "ascending")])
    write_parquet(part, out)
    normalized = int((np.abs(norms[known] - 1) > NORM_TOLERANCE).sum())
    return {"rows": part.num_rows, "normalized": normalized}


def import_embeddings(path: str, queries: str | Path, pool: str | Path, out_dir: Path) -> dict:
    """Validate the user's embeddings file and write it as EMBEDDINGS part files (module docstring)."""
    if not path:
        raise DataError("embedder.backend=precomputed needs embedder.embeddings_path")
    if not Path(path).is_file():
        raise DataError(f"embedder.embeddings_path: no file {path}")
    if Path(path).suffix != ".parquet":
        raise DataError(
            f"embedder.embeddings_path: {path} is not Parquet; write it as Parquet with columns id, "
            "embedding (pandas: df.to_parquet(path); JSONL is not read at this size)"
        )
    with parquet_errors(path):
        meta = pq.ParquetFile(path)
    absent = {"id", "embedding"} - set(meta.schema_arrow.names)
    if absent:
        raise DataError(f"{path}: missing column(s) {sorted(absent)}; need id, embedding")
    check_parquet_types(path, USER_EMBEDDINGS)
    items = _items(queries, pool, ["id", "dataset"])
    unused = _check_ids(path, items)
    dim = _first_dim(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, group, rows, first = [], [], 0, 0
    for rg in range(meta.metadata.num_row_groups):
        group.append(rg)
        rows += meta.metadata.row_group(rg).num_rows
        if rows - first >= IMPORT_ROWS or rg == meta.metadata.num_row_groups - 1:
            parts.append((group, first))
            group, first = [], rows
    todo = [
        (path, groups, start, items, dim, out_dir / f"part-{i:05d}.parquet")
        for i, (groups, start) in enumerate(parts)
        if not finished_parquet(out_dir / f"part-{i:05d}.parquet")
    ]
    report = {"rows": 0, "normalized": 0, "dim": dim, "unused": unused, "parts": len(parts)}
    report["parts_done_before"] = len(parts) - len(todo)
    for _, counts, _ in run_tasks(_import_part, todo):
        report["rows"] += counts["rows"]
        report["normalized"] += counts["normalized"]
    return report
