"""Retrieval metrics as pure functions of similarity scores.

One rule everywhere: a query's result is the rank of its best-placed correct candidate, counted
PESSIMISTICALLY — every wrong candidate scoring at least as high as the best correct one is ahead of it.
So a tie with a distractor is never a success (argmax would pick the first index on ties and flatter a
constant model), while ties among correct candidates cost nothing. MMEB's Precision@1, image-text
Recall@k and SugarCrepe's accuracy are all `recall_at_k` of these ranks (k = 1 for the first and last).
"""

from __future__ import annotations

import numpy as np


def first_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """`scores[i, j]`: similarity of query i to its candidate j (NaN = no candidate there, for ragged
    lists); `positive[i, j]`: candidate j is correct for query i. Returns, per query, how many wrong
    candidates score >= its best correct one: 0 means the query is answered right at rank 1."""
    if scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} differ in shape")
    if scores.shape[0] and not positive.any(axis=1).all():
        raise ValueError(
            f"queries {np.flatnonzero(~positive.any(axis=1)).tolist()} have no correct candidate"
        )
    best = np.where(positive, scores, -np.inf).max(axis=1, initial=-np.inf)
    # NaN >= x is False, so padding never counts as a wrong candidate ahead of the positive
    return ((scores >= best[:, None]) & ~positive).sum(axis=1)


def pessimistic_order(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Candidate positions of each row from best to worst score, with correct candidates placed after
    wrong ones they tie with (and padding, NaN, last): the first correct position is exactly
    `first_positive_rank`, so reranking a top-K starts from the same ranking the metric sees."""
    return np.lexsort((positive, -scores), axis=-1)


def recall_at_k(ranks: np.ndarray, k: int) -> float | None:
    """Percentage of queries whose first correct candidate is within the top k; None for no query."""
    if len(ranks) == 0:
        return None
    return float(100.0 * np.mean(np.asarray(ranks) < k))


def precision_at_1(scores: np.ndarray) -> float:
    """MMEB's metric on a [queries, candidates] matrix with the correct candidate at column 0, as a
    fraction (NaN for no query)."""
    if scores.shape[0] == 0:
        return float("nan")
    positive = np.zeros(scores.shape, dtype=bool)
    positive[:, 0] = True
    return float(np.mean(first_positive_rank(scores, positive) == 0))


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the values present (None for an empty group): a missing dataset is left out of an
    average, never counted as zero."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
