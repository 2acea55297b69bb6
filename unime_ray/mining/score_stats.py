"""The sample report's score populations (positives, every judged candidate, the selected negatives),
summarised from the files the sample tasks write, one file in memory at a time: count, mean and exact
median of each, and their histograms in `scores.png`.

The driver never concatenates a population: at MMEB's size the judged candidates are 31.8M floats, at
ten times that 318M (1.3 GB as float32, more again for a sort or a plot). The median is still exact,
and equal to `np.median` of the concatenation: the k-th value is found by counting values per bucket of
their float32 bit pattern (two passes of 2^16 buckets each), never by sorting. The mean is summed in
float64 (np.mean of the float32 concatenation sums in float32, so the two may differ in the last digits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unime_ray.io import atomic_path

SIGN = np.uint32(0x80000000)
HALF = 16  # bits per counting pass
POPULATIONS = {  # report key -> the sample tasks' array
    "positives": "pos_score",
    "candidates": "candidate_score",
    "negatives": "neg_score",
}


def save_scores(values: np.ndarray, path: Path) -> None:
    """One task's float32 scores of one population, atomically (an .npy file)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(values, dtype=np.float32))


def _load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order: the sign bit set for non-negative values, every bit
    flipped for negative ones (NaN is never given: the sample stage quarantines NaN scores)."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    return np.where(bits & SIGN, ~bits, bits | SIGN)


def _value(key: int) -> np.float32:
    """The float32 of a `_sortable` key."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def score_stats(files: list[Path]) -> dict:
    """count, mean and median of the values of `files`, the median as `np.median` gives it (for an even
    count the float32 mean of the two middle values). Each file is read twice: for the count, the sum and
    the values per bucket of their top 16 bits; then for the middle values' buckets, per low 16 bits."""
    size = 1 << HALF
    count, total, high = 0, 0.0, np.zeros(size, int)
    for f in files:
        values = _load(f)
        count, total = count + len(values), total + float(values.sum(dtype=np.float64))
        high += np.bincount(_sortable(values) >> HALF, minlength=size)
    if count == 0:
        return {"count": 0, "mean": None, "median": None}
    upto = np.cumsum(high)  # values in the buckets up to and including each
    ranks = sorted({(count - 1) // 2, count // 2})  # the middle value(s), 0-based
    buckets = [int(np.searchsorted(upto, k, side="right")) for k in ranks]
    low = {bucket: np.zeros(size, int) for bucket in buckets}
    for f in files:
        keys = _sortable(_load(f))
        for bucket, counts in low.items():
            counts += np.bincount(keys[(keys >> HALF) == bucket] & (size - 1), minlength=size)
    middle = []
    for k, bucket in zip(ranks, buckets, strict=True):
        within = k - (int(upto[bucket - 1]) if bucket else 0)
        middle.append(
            _value((bucket << HALF) | int(np.searchsorted(np.cumsum(low[bucket]), within, side="right")))
        )
    return {
        "count": count,
        "mean": total / count,
        "median": float(np.mean(np.array(middle, dtype=np.float32))),
    }


def plot_scores(populations: dict[str, list[Path]], beta: float, path: Path) -> None:
    """The three populations (`POPULATIONS` keys -> files) on one axis, as densities: their sizes differ
    by 10-50x. Each histogram is counted file by file and drawn from its bin counts."""
    low, high = 0.0, 1.0  # judge scores live in [0, 1]; scores brought from elsewhere may not, and must show
    for f in (f for files in populations.values() for f in files):
        values = _load(f)
        if len(values):
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    bins = np.linspace(low, high, 41)
    counts = {
        name: sum((np.histogram(_load(f), bins)[0] for f in files), np.zeros(len(bins) - 1, int))
        for name, files in populations.items()
    }
    sizes = {name: int(c.sum()) for name, c in counts.items()}
    # A bare Figure with an Agg canvas: no pyplot, so no global backend switch in the caller's process.
    fig = Figure(figsize=(10, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, label, color in [
        ("candidates", f"all judged candidates (n={sizes['candidates']})", "tab:gray"),
        (
            "negatives",
            f"selected negatives (n={sizes['negatives']}, with repeats and fallback 1.0s)",
            "tab:red",
        ),
        ("positives", f"positives s(q, c_t) (n={sizes['positives']})", "tab:green"),
    ]:
        if sizes[name]:
            style = dict(bins=bins, weights=counts[name], density=True, color=color)
            ax.hist(bins[:-1], histtype="stepfilled", alpha=0.3, label=label, **style)
            ax.hist(bins[:-1], histtype="step", linewidth=1.5, **style)
    ax.set_xlim(low, high)
    ax.set_xlabel("judge score s = e_yes / (e_yes + e_no)")
    ax.set_ylabel("density (each histogram has area 1)")
    ax.set_title(
        f"Judge scores of {sizes['positives']} sampled queries: {sizes['candidates']} judged candidates, "
        f"{sizes['negatives']} selected negatives (beta = {beta:g})"
    )
    ax.grid(alpha=0.3)
    if any(sizes.values()):
        ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
