"""Retrieve-then-rerank at evaluation: embed -> cosine top-K (default 10) -> UniME-V2-Reranker.

- listwise (the paper's pipeline): one prompt per query with its top-K numbered (1)..(K); the named
  candidate moves to the front, the rest keep their embedding order. An answer naming no valid
  candidate keeps the embedding order, and is counted per dataset ("unparsed").
- pointwise: the Yes-probability of each (query, candidate) of the top-K, optionally fused with the
  cosine (`alpha * p_yes + (1 - alpha) * cos`); ties are broken against the correct candidate, as in
  the embedding metric.

Candidates below the top-K keep their embedding ranks, so Recall@k for k > K is unchanged. Requests
run through a Ray Data actor pool (one reranker per GPU on a cluster) and are cached by content
(reranker fingerprint; mode, query and candidate list), so re-running a table costs no model call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from unime_ray.config import ModelConfig
from unime_ray.engine.actors import map_with_actors
from unime_ray.engine.shards import PATH_COL
from unime_ray.eval.cache import cache_identity, cached_map, model_folder
from unime_ray.eval.metrics import pessimistic_order
from unime_ray.eval.ranking import Collection, Ranked, Task
from unime_ray.models.prompts import JUDGE_INSTRUCTION, LIST_INSTRUCTION
from unime_ray.models.reranker import apply_listwise, fuse

MODES = ("listwise", "pointwise")
RESULTS = pa.schema([("key", pa.string()), ("pick", pa.int64()), ("p_yes", pa.list_(pa.float32()))])


class RerankActor:
    """`map_batches` callable: listwise rows get `pick` (0-based, -1 when unparsed), pointwise rows
    get `p_yes` per candidate. Images are absolute paths."""

    def __init__(self, model: dict) -> None:
        from unime_ray.models.reranker import Reranker

        self.reranker = Reranker(ModelConfig(**model))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        picks, p_yes = [-1] * len(rows), [[] for _ in rows]
        listwise = [i for i, r in enumerate(rows) if r["mode"] == "listwise"]
        if listwise:
            queries = [{"text": rows[i]["q_text"], "image": rows[i]["q_image"]} for i in listwise]
            cands = [
                [
                    {"text": t, "image": im}
                    for t, im in zip(rows[i]["c_text"], rows[i]["c_image"], strict=True)
                ]
                for i in listwise
            ]
            for i, pick in zip(listwise, self.reranker.listwise(queries, cands), strict=True):
                picks[i] = -1 if pick is None else pick
        pointwise = [i for i, r in enumerate(rows) if r["mode"] == "pointwise"]
        pairs = [
            (rows[i]["q_text"], rows[i]["q_image"], t, im)
            for i in pointwise
            for t, im in zip(rows[i]["c_text"], rows[i]["c_image"], strict=True)
        ]
        scores = self.reranker.score(pairs).tolist() if pairs else []
        for i in pointwise:
            n = len(rows[i]["c_text"])
            p_yes[i], scores = scores[:n], scores[n:]
        return pa.table(
            {
                "key": batch["key"],
                "pick": pa.array(picks, pa.int64()),
                "p_yes": pa.array(p_yes, pa.list_(pa.float32())),
                PATH_COL: batch[PATH_COL],
            }
        )


def requests(collection: Collection, task: Task, ranked: Ranked, mode: str) -> pa.Table:
    """One row per query: its record and its top-K candidates' records, keyed by their content."""
    items = collection.items
    tops = task.items_at(ranked.top)
    rows = []
    for q, top in zip(task.queries, tops, strict=True):
        cands = [items[i] for i in top if i >= 0]
        query = items[q]
        key = hashlib.sha256(json.dumps([mode, query, cands]).encode()).hexdigest()
        rows.append(
            {
                "key": key,
                "mode": mode,
                "q_text": query[0],
                "q_image": query[1],
                "c_text": [c[0] for c in cands],
                "c_image": [c[1] for c in cands],
            }
        )
    return pa.Table.from_pylist(rows)


def listwise_ranks(ranked: Ranked, picks: Sequence[int]) -> tuple[np.ndarray, int]:
    """Ranks after moving each query's pick (0-based in its top-K) to the front, and how many picks
    were unparsed (-1: the embedding order is kept)."""
    orders = []
    for top, pick in zip(ranked.top, picks, strict=True):
        n = int((top >= 0).sum())
        orders.append(apply_listwise(list(range(n)), None if pick < 0 else pick))
    return _reranked_ranks(ranked, orders), sum(p < 0 for p in picks)


def pointwise_ranks(ranked: Ranked, p_yes: Sequence[Sequence[float]], alpha: float) -> np.ndarray:
    """Ranks after ordering each query's top-K by `alpha * p_yes + (1 - alpha) * cos`, ties broken
    against the correct candidate."""
    orders = []
    for cos, positive, p in zip(ranked.top_cos, ranked.top_positive, p_yes, strict=True):
        n = len(p)
        fused = fuse(np.asarray(p, dtype=np.float64), cos[:n].astype(np.float64), alpha)
        orders.append(pessimistic_order(fused[None], positive[None, :n])[0].tolist())
    return _reranked_ranks(ranked, orders)


def _reranked_ranks(ranked: Ranked, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """The first correct candidate's position in each reordered top-K, or its embedding rank (>= K)
    when none is in the top-K."""
    ranks = ranked.ranks.copy()
    for i, order in enumerate(orders):
        hits = np.flatnonzero(ranked.top_positive[i, list(order)])
        if len(hits):
            ranks[i] = hits[0]
    return ranks


def rerank(
    jobs: list[tuple[Collection, Task, Ranked]],
    modes: Sequence[str],
    model: ModelConfig,
    cache_dir: str | Path,
    *,
    alpha: float = 1.0,
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
    shard_rows: int = 512,
) -> tuple[dict[tuple[str, str, str], np.ndarray], dict[tuple[str, str], int], int]:
    """Rerank every (collection, task, embedding ranking) in every mode, through ONE actor pool.

    Returns ({(collection key, task, mode): ranks}, {(collection key, task): unparsed listwise
    answers}, requests computed now (0 when everything was cached))."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown rerank modes {sorted(unknown)}; known: {list(MODES)}")
    identity = cache_identity(model, {"prompts": [JUDGE_INSTRUCTION, LIST_INSTRUCTION]})
    folder = model_folder(Path(cache_dir) / "rerank", identity)

    def transform(ds: ray.data.Dataset) -> ray.data.Dataset:
        return map_with_actors(
            ds,
            RerankActor,
            {"model": asdict(model)},
            batch_size=model.batch_size,
            batch_format="pyarrow",
            num_actors=num_actors,
            gpus_per_actor=gpus_per_actor,
        )

    tables = {(c.key, t.name, m): requests(c, t, r, m) for c, t, r in jobs for m in modes}
    parts: dict[str, list[pa.Table]] = {}
    for (key, _, _), table in tables.items():
        parts.setdefault(key, []).append(table)
    done, computed = cached_map(
        {k: pa.concat_tables(v) for k, v in parts.items()},
        ["key"],
        folder,
        transform,
        RESULTS,
        shard_rows,
        "rerank",
    )
    answers = {}
    for table in done.values():
        for row in table.to_pylist():
            answers[row["key"]] = (row["pick"], row["p_yes"])
    ranks, unparsed = {}, {}
    for c, t, r in jobs:
        for m in modes:
            got = [answers[k] for k in tables[(c.key, t.name, m)]["key"].to_pylist()]
            if m == "listwise":
                ranks[(c.key, t.name, m)], unparsed[(c.key, t.name)] = listwise_ranks(r, [p for p, _ in got])
            else:
                ranks[(c.key, t.name, m)] = pointwise_ranks(r, [p for _, p in got], alpha)
    return ranks, unparsed, computed
