"""PNG plots of an evaluation's results: MMEB meta-task bars and retrieval Recall@k curves, one series
per method (embedding, + listwise, + pointwise). Drawn headless (Agg) and written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from unime_ray.eval.report import summary_columns  # noqa: E402
from unime_ray.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def mmeb_bars(results: dict, path: Path) -> Path | None:
    """Grouped bars of the meta-task / IND / OOD / Overall averages, one panel per group (the paper's
    36 datasets, then any others)."""
    summary = results.get("mmeb", {}).get("summary")
    if not summary:
        return None
    methods = results["methods"]
    panels = [
        (g, summary_columns([c for c, v in summary[methods[0]][g].items() if v["datasets"]]))
        for g in ("mmeb", "other")
    ]
    panels = [(g, cols) for g, cols in panels if cols]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, (group, columns) in zip(axes[0], panels, strict=True):
        for i, m in enumerate(methods):
            values = [summary[m][group][c]["score"] or 0.0 for c in columns]
            ax.bar([x + i * width for x in range(len(columns))], values, width, label=m)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(columns))])
        ax.set_xticklabels(columns, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("Precision@1 (%)")
        ax.set_title("MMEB" if group == "mmeb" else "MMEB-format sets outside the 36")
        ax.legend(fontsize=8)
    return _save(fig, path)


def recall_curves(results: dict, path: Path) -> Path | None:
    """Recall@k against k for every retrieval dataset and direction."""
    retrieval = results.get("retrieval")
    if not retrieval:
        return None
    panels = [(name, t) for name in sorted(retrieval) for t in ("i2t", "t2i")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (name, t) in zip(axes[0], panels, strict=True):
        for m in results["methods"]:
            curve = retrieval[name][t]["curve"][m]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=m)
        ax.set_title(f"{name} {'image→text' if t == 'i2t' else 'text→image'}")
        ax.set_xlabel("k")
        ax.set_ylabel("Recall@k (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    return _save(fig, path)
