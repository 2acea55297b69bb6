"""End-to-end mining throughput on the synthetic world: mined queries/s and where the time goes.

    python bench/mine.py                   # tiny Qwen2-VL embedder + judge (transformers), local Ray
    python bench/mine.py --set judge.backend=vllm

Each stage's seconds come from the job's own report (Ray start-up excluded); the judge's share of the
total is the figure that matters at scale (662k queries x 51 calls). Writes bench/results/mine.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
from pathlib import Path

from unime_ray.assets import prepare_synthetic, synthetic_overrides
from unime_ray.config import load_config
from unime_ray.mining.pipeline import run_mining
from unime_ray.ray_utils import init_ray

ROOT = Path(__file__).parents[1]
OUT = ROOT / "bench" / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    run = OUT / "mine-run"
    shutil.rmtree(run / "mining", ignore_errors=True)
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [*synthetic_overrides(run), *a.overrides])
    prepare_synthetic(cfg)
    init_ray()
    report = run_mining(cfg)
    seconds = {stage: report[stage]["seconds"] for stage in report}
    total = sum(seconds.values())
    queries = report["ingest"]["queries"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores {platform.machine()}",
        "judge_backend": cfg.judge.backend,
        "queries": queries,
        "judge_calls": report["judge"]["rows"],
        "seconds": seconds,
        "mined_queries_per_s": round(queries / total, 2),
        "judge_calls_per_s": round(report["judge"]["rows"] / seconds["judge"], 1),
        "judge_share_of_time": round(seconds["judge"] / total, 3),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mine.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
