"""Embeddings with planted structure for a mining run's ingest output, without a model: each pool item a
seeded random direction, each query its positive's direction plus noise, so retrieval ranks the
positive (excluded by id) and the items near it first, and some fall inside `delta`. Deterministic from
the ids alone, so the same ingest output gives the same file under any code version (the regression
fixture of test_scale.py was made from it with the code before the scale-out)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _direction(key: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim)


def planted_embeddings(ingest_dir: Path, dim: int = 16) -> pa.Table:
    """`id`, `dataset`, `kind`, `embedding` (float32, not normalized) for every query and pool item."""
    queries = pq.read_table(Path(ingest_dir) / "queries.parquet").to_pylist()
    pool = pq.read_table(Path(ingest_dir) / "pool.parquet").to_pylist()
    vectors = {c["id"]: _direction(c["id"], dim) for c in pool}
    rows = [
        {
            "id": q["id"],
            "dataset": q["dataset"],
            "kind": "query",
            "embedding": vectors[q["pos_id"]] + 0.6 * _direction(q["id"], dim),
        }
        for q in queries
    ] + [
        {"id": c["id"], "dataset": c["dataset"], "kind": "candidate", "embedding": vectors[c["id"]]}
        for c in pool
    ]
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "dataset": [r["dataset"] for r in rows],
            "kind": [r["kind"] for r in rows],
            "embedding": pa.array([r["embedding"].astype(np.float32) for r in rows], pa.list_(pa.float32())),
        }
    )
