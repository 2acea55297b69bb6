"""Training throughput and memory: samples/s for 1 vs 2 Ray Train workers (DeepSpeed ZeRO-2, same
global batch), with and without gradient checkpointing, and each worker's peak memory; and the wall
time of the job when it reports to Ray Train every step instead of every 10.

    python bench/train.py                       # the ~3M "mid" Qwen2-VL on the synthetic world, 12 steps
    python bench/train.py --size tiny --steps 20

Mines the synthetic world once (oracle judge scores: no judge model needed), then runs the embedder
training job per setting. samples/s is the median over steps after the first two (start-up excluded)
of the job's own per-step figure; peak memory is each worker's peak RSS (peak CUDA allocation on
GPU) from its final_rank*.json; s/step is wall time per step after the first (reports and data waits
included), job s the whole job with start-up. Ratios are against 1 worker without checkpointing, in
the same run.
Writes bench/results/train.json (`--results`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from unime_ray.config import load_config
from unime_ray.demo import mine_with_oracle
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import init_ray
from unime_ray.train.loop import run_training

ROOT = Path(__file__).parents[1]
OUT = ROOT / "bench" / "results"
# name -> overrides; the global batch (16) is the same for all. Half a CPU per worker: two workers must
# leave Ray Data a CPU to read with on a 2-core machine (torch still runs one thread per worker).
SETTINGS = {
    f"{workers} worker{'s' if workers > 1 else ''}{' + grad ckpt' if ckpt else ''}": [
        f"train.num_workers={workers}",
        f"train.micro_batch_size={16 // workers}",
        "train.cpus_per_worker=0.5",
        f"train.gradient_checkpointing={str(ckpt).lower()}",
    ]
    for ckpt in (False, True)
    for workers in (1, 2)
}
# Each ray.train.report is a cross-rank barrier that waits on the controller: reporting every step
# (instead of every train.report_every=10) shows in the wall time, not in the per-step samples/s.
SETTINGS["1 worker, report every step"] = SETTINGS["1 worker"] + ["train.report_every=1"]
# MLflow tracking (on by default, every step logged from rank 0) against none: the wall time per step.
SETTINGS["1 worker, tracking off"] = SETTINGS["1 worker"] + ["tracking.enabled=false"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="mid", help="tiny model size to train (tiny, mid, small)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument(
        "--only", nargs="+", choices=list(SETTINGS), help="run these settings (always with 1 worker)"
    )
    p.add_argument("--results", default=str(OUT / "train.json"), help="where the figures go")
    a = p.parse_args()
    run = OUT / "train-run"
    init_ray()
    model = run / "models" / a.size
    if not (model / "config.json").is_file():
        make_tiny(model, "qwen2-vl", a.size)
    overrides = mine_with_oracle(ROOT / "jobs/configs/tiny.yaml", run, [f"train.model.path={model}"])
    rows = {}
    chosen = {"1 worker", *a.only} if a.only else set(SETTINGS)
    for name, setting in ((n, s) for n, s in SETTINGS.items() if n in chosen):
        out = run / name.replace(" ", "_").replace("+", "")
        shutil.rmtree(out, ignore_errors=True)
        more = [f"run.output_dir={out}", f"train.steps={a.steps}", f"train.checkpoint_every={a.steps}"]
        more.append(f"train.data_path={run}/mining/sample/hard_negatives.parquet")
        start = time.perf_counter()
        result = run_training(
            load_config(ROOT / "jobs/configs/tiny.yaml", overrides + setting + more), "embed"
        )
        wall = time.perf_counter() - start
        metrics = [json.loads(x) for x in Path(result["metrics_path"]).read_text().splitlines()]
        finals = [json.loads(f.read_text()) for f in sorted((out / "train_embed").glob("final_rank*.json"))]
        rows[name] = {
            "samples_per_s": statistics.median(m["samples_per_s"] for m in metrics[2:]),
            "peak_mem_mb_per_worker": [round(f["peak_mem_mb"]) for f in finals],
            "loss_last": metrics[-1]["loss"],
            "wall_s": wall,
            # steady state, start-up excluded: wall seconds per step between the 2nd and the last step
            "wall_s_per_step": (metrics[-1]["time"] - metrics[1]["time"]) / (len(metrics) - 2),
        }
    base = rows["1 worker"]
    for row in rows.values():
        row["speed_vs_1_worker"] = row["samples_per_s"] / base["samples_per_s"]
        row["wall_per_step_vs_1_worker"] = row["wall_s_per_step"] / base["wall_s_per_step"]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "model": a.size,
        "steps": a.steps,
        "global_batch": 16,
        "settings": rows,
    }
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(report, indent=2))
    x1 = "x 1 worker"
    print(f"{'setting':28s} {'samples/s':>10s} {x1:>10s} {'s/step':>8s} {x1:>10s} {'job s':>7s}  peak MB")
    for name, row in rows.items():
        print(
            f"{name:28s} {row['samples_per_s']:10.1f} {row['speed_vs_1_worker']:10.2f} "
            f"{row['wall_s_per_step']:8.2f} {row['wall_per_step_vs_1_worker']:10.2f} {row['wall_s']:7.1f}  "
            f"{row['peak_mem_mb_per_worker']}"
        )


if __name__ == "__main__":
    main()
