"""Agreement statistics of two score lists or two yes/no decision lists: rank correlations, overlap,
Cohen's kappa, AUC, and the spread of a per-query statistic. Pure numpy; undefined values (a constant
side, no pair) are NaN inside and None in results, since JSON has no NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a positive outscores a negative (ties count half): Mann-Whitney's U / (n+ n-)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks; NaN when a side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((pairs - ties in a) (pairs - ties in b)), over
    all pairs (n is ~51 per query); NaN when a side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    upper = np.triu_indices(len(a), k=1)
    da = np.sign(a[:, None] - a[None, :])[upper]
    db = np.sign(b[:, None] - b[None, :])[upper]
    denom = math.sqrt(float(np.count_nonzero(da)) * float(np.count_nonzero(db)))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets agree fully (1.0)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def defined(x: float | None) -> float | None:
    """NaN as None (JSON has no NaN)."""
    return None if x is None or math.isnan(x) else float(x)


@dataclass
class Spread:
    """Median, interquartile range and mean of a per-query statistic over the queries where it is
    defined (`n`); `undefined` counts the others. The statistics are None when no value is defined."""

    n: int
    undefined: int
    median: float | None
    p25: float | None
    p75: float | None
    mean: float | None


def spread(values: list[float | None]) -> Spread:
    """The `Spread` of `values`; None and NaN are undefined."""
    v = np.asarray([x for x in values if defined(x) is not None], dtype=np.float64)
    if not len(v):
        return Spread(0, len(values), None, None, None, None)
    p25, median, p75 = (float(q) for q in np.percentile(v, [25, 50, 75]))
    return Spread(len(v), len(values) - len(v), median, p25, p75, float(v.mean()))


@dataclass
class TwoWay:
    """A yes/no decision made by two settings A and B: counts of yes by both, A only, B only, neither;
    the share on which they agree and Cohen's kappa (None without decisions, or when chance alone
    agrees fully)."""

    both: int
    a_only: int
    b_only: int
    neither: int
    total: int
    agreement: float | None
    kappa: float | None


def two_way(a: np.ndarray, b: np.ndarray) -> TwoWay:
    """The `TwoWay` table of decisions `a` and `b` (one bool per decided item, in the same order)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = len(a)
    counts = (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))
    if not n:
        return TwoWay(*counts, total=0, agreement=None, kappa=None)
    agree = (counts[0] + counts[3]) / n
    pa_, pb = a.mean(), b.mean()
    chance = pa_ * pb + (1 - pa_) * (1 - pb)
    kappa = (agree - chance) / (1 - chance) if chance < 1 else math.nan
    return TwoWay(*counts, total=n, agreement=agree, kappa=defined(kappa))
