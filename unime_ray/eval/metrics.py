"""Retrieval metrics, as pure functions of similarity scores."""

from __future__ import annotations

import numpy as np


def precision_at_1(scores: np.ndarray) -> float:
    """MMEB's metric. `scores[i, j]` = similarity of query i to ITS OWN candidate j, with the correct
    candidate at j = 0. A query counts as correct when candidate 0 scores strictly highest: a tie with a
    distractor is not a success (argmax would pick index 0 on ties and flatter a constant model)."""
    if scores.shape[0] == 0:
        return float("nan")
    best_other = scores[:, 1:].max(axis=1) if scores.shape[1] > 1 else np.full(len(scores), -np.inf)
    return float(np.mean(scores[:, 0] > best_other))
