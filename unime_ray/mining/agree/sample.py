"""The seeded sample of a run's queries that both settings judge: drawn from the run's retrieved
candidates and written as judge request shards exactly as the judge stage writes them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.engine.shards import write_request_shards
from unime_ray.mining.judge import build_requests


@dataclass
class SampleCounts:
    """The run's queries and judge calls (each query's candidates plus its positive); the sample's
    queries, calls and images (query and candidate images of its calls)."""

    run_queries: int
    run_calls: int
    queries: int
    calls: int
    images: int


def sample_query_ids(ids: list[str] | pa.Array, n: int, seed: int) -> list[str]:
    """`n` distinct query ids drawn with `seed` from the distinct ids given (in any order, with repeats):
    the same ids and seed give the same sample, in id order."""
    ordered = sorted(set(ids.to_pylist() if isinstance(ids, pa.Array | pa.ChunkedArray) else ids))
    pick = np.random.default_rng(seed).choice(len(ordered), size=min(n, len(ordered)), replace=False)
    return sorted(ordered[i] for i in pick)


def _requests(mining: Path, files: list[Path], chosen: list[str]) -> pa.Table:
    """The judge requests of the `chosen` queries, read dataset by dataset from the retrieve `files`
    and the run's ingested queries and pool, in the judge stage's order."""
    parts = []
    for path in files:
        cands = pq.read_table(path, filters=[("query_id", "in", chosen)])
        if not cands.num_rows:
            continue
        names = pc.unique(cands["dataset"]).to_pylist()
        queries = pq.read_table(
            mining / "ingest/queries.parquet",
            columns=["id", "dataset", "text", "image", "pos_id"],
            filters=[("dataset", "in", names), ("id", "in", chosen)],
        )
        pool = pq.read_table(
            mining / "ingest/pool.parquet",
            columns=["id", "dataset", "text", "image"],
            filters=[("dataset", "in", names)],
        )
        parts.append(build_requests(cands, queries, pool))
    return pa.concat_tables(parts).sort_by([("query_id", "ascending"), ("rank", "ascending")])


def write_sample(
    mining: Path, n: int, seed: int, out_dir: Path, per_shard: int
) -> tuple[list[Path], SampleCounts]:
    """Judge request shards (`per_shard` queries each, `out_dir` emptied first) for a seeded sample of
    `n` of the queries retrieved in `mining` (a run's `mining` folder): each query with its positive and
    candidates, as the judge stage builds them; and the counts of the run and of the sample."""
    files = sorted((mining / "retrieve").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{mining / 'retrieve'}: no retrieved candidates")
    ids = [pc.unique(pq.read_table(f, columns=["query_id"])["query_id"]) for f in files]
    run_calls = sum(pq.read_metadata(f).num_rows for f in files) + sum(len(i) for i in ids)
    chosen = sample_query_ids(pa.chunked_array(ids, pa.string()), n, seed)
    requests = _requests(mining, files, chosen)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shards = write_request_shards(requests, out_dir, per_shard, group="query_id")
    images = int(pc.sum(pc.not_equal(requests["qry_image"], "")).as_py() or 0) + int(
        pc.sum(pc.not_equal(requests["cand_image"], "")).as_py() or 0
    )
    counts = SampleCounts(
        run_queries=sum(len(i) for i in ids),
        run_calls=run_calls,
        queries=len(chosen),
        calls=requests.num_rows,
        images=images,
    )
    return shards, counts
