"""MMEB: each query ranks its OWN candidate list (ground truth at index 0); Precision@1 per dataset.

An exact copy of the ground truth elsewhere in the list (same text and image) is the same candidate,
so it counts as correct rather than as a distractor the query can never beat.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from unime_ray.config import ModelConfig
from unime_ray.eval.cache import embed_collections
from unime_ray.eval.metrics import recall_at_k
from unime_ray.eval.ranking import Collection, ItemIndex, Task, padded, rank


def mmeb_collections(table: pa.Table, image_root: str | Path) -> list[Collection]:
    """EVAL-schema table (`data.mmeb.read_folder(..., "eval")`) -> one collection per dataset."""
    rows_by_dataset: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows_by_dataset.setdefault(row["dataset"], []).append(row)
    collections = []
    for name, rows in rows_by_dataset.items():
        index = ItemIndex(image_root)
        queries = [index.add(r["qry_text"], r["qry_image"]) for r in rows]
        lists = [[index.add(t, i) for t, i in zip(r["tgt_text"], r["tgt_image"], strict=True)] for r in rows]
        positives = [np.flatnonzero(np.asarray(cands) == cands[0]) for cands in lists]
        task = Task(name, np.asarray(queries), padded(lists), positives)
        info = {"queries": len(rows), "candidates": int(np.mean([len(c) for c in lists]))}
        collections.append(Collection("mmeb", name, index.items, [task], info))
    return collections


def evaluate_mmeb(
    table: pa.Table,
    model: ModelConfig,
    image_root: str,
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
    cache_dir: str | Path | None = None,
) -> dict[str, float | None]:
    """EVAL-schema table -> {dataset: P@1 in %}, embedding through a Ray Data actor pool (cached under
    `cache_dir` when given). The full job with tables and reranking is `unime_ray.eval.job`."""
    collections = mmeb_collections(table, image_root)
    scratch = tempfile.TemporaryDirectory() if cache_dir is None else contextlib.nullcontext(cache_dir)
    with scratch as folder:
        vectors, _ = embed_collections(
            collections, model, folder, num_actors=num_actors, gpus_per_actor=gpus_per_actor
        )
    return {
        c.name: recall_at_k(rank(c.tasks[0], vectors[c.key], top_k=1).ranks, 1)
        for c in sorted(collections, key=lambda c: c.name)
    }
