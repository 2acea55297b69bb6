"""Entry points of the two training jobs (`jobs/train_embed.py`, `jobs/train_rerank.py`, `unime-ray
train-embed|train-rerank`) and the learning-curve plot."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from unime_ray.assets import prepare_synthetic
from unime_ray.config import Config, add_config_args, config_from_args
from unime_ray.preflight import PreflightError, check_job
from unime_ray.ray_utils import init_ray
from unime_ray.runlock import command_lock
from unime_ray.tracking import end_stage
from unime_ray.train.loop import SECTIONS, run_training


def plot_curves(metrics_path: Path, out: Path, title: str) -> Path:
    """One panel per metric against the optimizer step (the last entry per step wins: a resumed run
    re-logs the steps after its checkpoint)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        entry = json.loads(line)
        rows[entry["step"]] = entry
    steps = sorted(rows)
    # every metric logged, in first-seen order: some only at checkpoints (the reranker's ranking check)
    names = [
        k
        for k in dict.fromkeys(k for s in steps for k in rows[s])
        if k not in ("step", "samples_per_s", "time")
    ]
    fig = Figure(figsize=(4 * len(names), 3.2))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        logged = [s for s in steps if name in rows[s]]
        ax.plot(logged, [rows[s][name] for s in logged], marker="o" if len(logged) < 20 else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


LABELS = {"embed": "embedder", "rerank": "reranker"}


def train(cfg: Config, kind: str, restart: bool = False) -> dict:
    """One training run (`run_training`), then its learning curves beside its metrics.jsonl; the
    summary gains their path as "curves". With tracking on, the run's MLflow stage (its steps logged by
    rank 0) gains the training section, the checkpoint path and the plot, and is closed."""
    summary = run_training(cfg, kind, restart)
    metrics = Path(summary["metrics_path"])
    curves = plot_curves(metrics, metrics.with_name("learning_curves.png"), f"UniME-V2 {LABELS[kind]}")
    section = getattr(cfg, SECTIONS[kind])
    params = {
        SECTIONS[kind]: asdict(section),
        "checkpoint": summary["checkpoint"],
        "weights": summary["weights"],
    }
    end_stage(cfg, summary.get("mlflow_run_id"), params=params, artifacts=[curves, metrics])
    return {**summary, "curves": str(curves)}


def main(argv: list[str] | None = None, kind: str = "embed") -> dict:
    p = argparse.ArgumentParser(
        prog=f"unime-ray train-{kind}", description=f"Train the UniME-V2 {LABELS[kind]} on Ray Train"
    )
    add_config_args(p, default="jobs/configs/tiny.yaml")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start a fresh run even when the last one could resume (it is moved to archive/, not deleted)",
    )
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    with command_lock(cfg.run.output_dir, f"train-{kind}"):
        prepare_synthetic(cfg)
        try:
            check_job(cfg, f"train_{kind}")
        except PreflightError as e:
            raise SystemExit(f"[train-{kind}] stopped: {e}") from None
        init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
        print(f"[train-{kind}] started", flush=True)
        start = time.perf_counter()
        summary = train(cfg, kind, args.restart)
    metrics = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["metrics"].items()
    )
    print(
        f"[train-{kind}] done in {time.perf_counter() - start:.1f} s: {metrics}; weights {summary['weights']}"
    )
    print(json.dumps(summary, default=str), flush=True)
    return summary


def main_rerank(argv: list[str] | None = None) -> dict:
    return main(argv, "rerank")
