"""The one shape every benchmark here is evaluated in: queries ranking candidates.

A `Collection` is one dataset: its distinct items (text, image) — embedded once and cached together —
and one or more `Task`s over them. A task's queries rank either their own candidate lists (MMEB: ~1000
per query; SugarCrepe: the true and the altered caption) or one gallery shared by all (image-text
retrieval over the full test set), and each query knows which candidate positions are correct (several
for an image with five captions). `rank` turns embeddings into the metric's ranks and the embedding
top-K that a reranker reorders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unime_ray.eval.metrics import first_positive_rank, pessimistic_order

Item = tuple[str, str]  # (text, image path; "" for none). Paths are absolute so roots can differ by suite.

# Bound on the [queries x candidates x dim] floats gathered at once for per-query candidate lists
CHUNK_FLOATS = 1 << 25


@dataclass
class Task:
    """`candidates`: [m] item indices shared by every query (a gallery) or [n, m] per query, padded
    with -1. `positives[i]`: positions in query i's candidates that are correct (at least one)."""

    name: str
    queries: np.ndarray
    candidates: np.ndarray
    positives: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.queries):
            raise ValueError(f"{self.name}: {len(self.queries)} queries but {len(self.positives)} positives")
        if self.candidates.ndim == 2 and len(self.candidates) != len(self.queries):
            raise ValueError(f"{self.name}: candidate lists do not match the queries")

    @property
    def gallery(self) -> bool:
        return self.candidates.ndim == 1

    def items_at(self, positions: np.ndarray) -> np.ndarray:
        """[n, k] candidate positions of every query (-1 = none) -> their item indices (-1 = none)."""
        safe = np.maximum(positions, 0)
        items = self.candidates[safe] if self.gallery else np.take_along_axis(self.candidates, safe, axis=1)
        return np.where(positions >= 0, items, -1)

    def positive_mask(self, rows: slice) -> np.ndarray:
        width = len(self.candidates) if self.gallery else self.candidates.shape[1]
        chosen = self.positives[rows]
        mask = np.zeros((len(chosen), width), dtype=bool)
        for i, positions in enumerate(chosen):
            mask[i, positions] = True
        return mask


@dataclass
class Collection:
    """One dataset of a suite ("mmeb", "retrieval", "compositional"): items embedded together."""

    suite: str
    name: str
    items: list[Item]
    tasks: list[Task]
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"


class ItemIndex:
    """Distinct items in first-seen order: a candidate shared by many queries is embedded once, and an
    exact duplicate is the same candidate (so a duplicated ground truth is never its own distractor)."""

    def __init__(self, image_root: str | Path) -> None:
        self.root = Path(image_root)
        self.index: dict[Item, int] = {}

    def add(self, text: str, image: str) -> int:
        item = (text, str(self.root / image) if image else "")
        return self.index.setdefault(item, len(self.index))

    @property
    def items(self) -> list[Item]:
        return list(self.index)


def padded(lists: list[list[int]]) -> np.ndarray:
    """Ragged lists of item indices -> [n, max_len] int64 padded with -1."""
    out = np.full((len(lists), max((len(x) for x in lists), default=0)), -1, dtype=np.int64)
    for i, row in enumerate(lists):
        out[i, : len(row)] = row
    return out


@dataclass
class Ranked:
    """A task under one embedding: `ranks` per query (wrong candidates scoring >= its best correct one),
    and the top-K in pessimistic embedding order: candidate positions (-1 padding), their cosines and
    whether each is correct."""

    ranks: np.ndarray
    top: np.ndarray
    top_cos: np.ndarray
    top_positive: np.ndarray


def _scores(task: Task, emb: np.ndarray, rows: slice) -> np.ndarray:
    queries = emb[task.queries[rows]]
    if task.gallery:
        return queries @ emb[task.candidates].T
    cands = task.candidates[rows]
    scores = np.einsum("bmd,bd->bm", emb[np.maximum(cands, 0)], queries)
    return np.where(cands >= 0, scores, np.nan)


def rank(task: Task, emb: np.ndarray, top_k: int) -> Ranked:
    """Score every query against its candidates in bounded chunks (a COCO gallery is 25k x 5k)."""
    n = len(task.queries)
    width = len(task.candidates) if task.gallery else task.candidates.shape[1]
    per_row = width if task.gallery else width * emb.shape[1]
    step = max(1, CHUNK_FLOATS // max(per_row, 1))
    k = min(top_k, width)
    ranks = np.zeros(n, dtype=np.int64)
    top = np.full((n, k), -1, dtype=np.int64)
    top_cos = np.full((n, k), np.nan, dtype=np.float32)
    top_positive = np.zeros((n, k), dtype=bool)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        scores, positive = _scores(task, emb, rows), task.positive_mask(rows)
        ranks[rows] = first_positive_rank(scores, positive)
        order = pessimistic_order(scores, positive)[:, :k]
        cos = np.take_along_axis(scores, order, axis=1)
        valid = ~np.isnan(cos)
        top[rows] = np.where(valid, order, -1)
        top_cos[rows] = cos
        top_positive[rows] = np.take_along_axis(positive, order, axis=1) & valid
    return Ranked(ranks, top, top_cos, top_positive)
