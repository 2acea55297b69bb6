"""Is the reranker learning to rank? P@1 of the positive among a query's candidates, pointwise and
listwise, measured during training through the inference path that eval and serve use
(`models.reranker.Reranker`), on a fixed sample of training queries and of held-out queries.

Per-token accuracies can look fine while the model ranks at chance (a Yes/No prior per candidate text,
a listwise answer that always names one position): a ranking figure logged beside them shows it. The
held-out queries are rows of the mined file withheld from training, so no extra data is needed.

A query's candidates are its positive and its distinct mined negatives (highest judge score first, up
to `list_size`), in an order drawn once per query from the run seed: the same lists at every check.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq

from unime_ray.config import RerankerConfig
from unime_ray.keyed import key_int


def monitor_rows(path: str, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), n of each, picked by a seeded hash of the query id: the same rows
    for the same file and seed. The held-out ones must be withheld from training (`held_out_ids`)."""
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    picked = sorted(range(len(ids)), key=lambda i: key_int(f"{seed}:{ids[i]}"))[: 2 * n]
    rows = table.take(picked).to_pylist()
    return rows[:n], rows[n:]


def candidates(row: dict, list_size: int, seed: int) -> tuple[dict, list[dict], int]:
    """(query, candidates, position of the positive) of a mined row, in the row's fixed order."""
    negs = sorted(
        zip(row["neg_texts"], row["neg_images"], row["neg_scores"], strict=True), key=lambda n: -n[2]
    )
    unique = list(dict.fromkeys((t, i) for t, i, _ in negs))[:list_size]
    cands = [(row["pos_text"], row["pos_image"]), *unique]
    order = list(range(len(cands)))
    random.Random(key_int(f"{seed}:{row['id']}")).shuffle(order)
    listed = [{"text": cands[i][0], "image": cands[i][1]} for i in order]
    return {"text": row["qry_text"], "image": row["qry_image"]}, listed, order.index(0)


def rank_p_at_1(reranker, rows: list[dict], cfg: RerankerConfig, seed: int) -> dict[str, float]:
    """Pointwise P@1 (the positive's p(Yes) strictly above every other candidate's: ties count against
    it, as in eval) and listwise P@1 (the model's answer names the positive), in %, over `rows`."""
    queries, lists, truth = zip(*(candidates(r, cfg.list_size, seed) for r in rows), strict=True)
    point = [
        (p := reranker.pointwise(q, c))[t] > np.delete(p, t).max()
        for q, c, t in zip(queries, lists, truth, strict=True)
    ]
    picks = reranker.listwise(list(queries), list(lists))
    listwise = [pick == t for pick, t in zip(picks, truth, strict=True)]
    return {"point_p@1": 100.0 * np.mean(point), "list_p@1": 100.0 * np.mean(listwise)}
