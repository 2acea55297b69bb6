"""PNG plots of an evaluation's results: MMEB meta-task bars and retrieval Recall@k curves, one series
per method (embedding, + listwise, + pointwise). Drawn on a bare `Figure` with an Agg canvas, as every
plot of the package is: no pyplot, so no global backend switch in the caller's process, and no
figure registry to close. Written atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unime_ray.eval.report import summary_columns
from unime_ray.io import atomic_path


def _panels(n: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure of `n` panels side by side, each `width` x `height` inches."""
    fig = Figure(figsize=(width * n, height))
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
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
    fig, axes = _panels(len(panels), 6, 4)
    width = 0.8 / len(methods)
    for ax, (group, columns) in zip(axes, panels, strict=True):
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
    fig, axes = _panels(len(panels), 4, 3.5)
    for ax, (name, t) in zip(axes, panels, strict=True):
        for m in results["methods"]:
            curve = retrieval[name][t]["curve"][m]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=m)
        ax.set_title(f"{name} {'image→text' if t == 'i2t' else 'text→image'}")
        ax.set_xlabel("k")
        ax.set_ylabel("Recall@k (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    return _save(fig, path)
