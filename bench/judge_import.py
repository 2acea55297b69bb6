"""The judge stage's bring-your-own path alone, on a finished `bench/scale.py` run: the request shards
written from the run's candidates (`write_requests`, ids only), then the planted scores joined onto them
(`attach_precomputed`); both compared file by file, byte for byte, with the run's own.

    python bench/judge_import.py /tmp/unime-scale/new-n662000 --out /tmp/ji-new
    # the code before a change, on the same run (a worktree of the old commit):
    PYTHONPATH=/tmp/unime-old python bench/judge_import.py RUN --out /tmp/ji-old --label old

Measured per phase: wall seconds, and the peak RSS of the largest Ray worker (`ray::` processes of this
session, sampled every 0.2 s; the work runs in tasks, so the driver's GIL does not stop the sampler).
Results go to `bench/results/judge_import.json`, one entry per (label, run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import psutil

from unime_ray.config import MiningConfig
from unime_ray.mining.judge import attach_precomputed, write_requests
from unime_ray.ray_utils import init_ray

RESULTS = Path(__file__).parent / "results" / "judge_import.json"
FOLDERS = {"requests": "requests", "scores": "results"}  # each phase's output folder under judge/


def largest_worker_mb(stop: threading.Event, peak: list[float]) -> None:
    """Until `stop`: the largest RSS of this process's `ray::` descendants, in MB, into peak[0]."""
    me = psutil.Process()
    while not stop.wait(0.2):
        for child in me.children(recursive=True):
            try:
                if child.name().startswith("ray::"):
                    peak[0] = max(peak[0], child.memory_info().rss / 2**20)
            except psutil.Error:
                continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished bench/scale.py run folder")
    parser.add_argument("--out", type=Path, required=True, help="where the fresh requests and scores go (replaced)")
    parser.add_argument("--label", default="new", help="the code's name in the results")
    args = parser.parse_args()
    mining, out = args.run / "mining", args.out
    shutil.rmtree(out, ignore_errors=True)
    init_ray()
    phases = {
        "requests": lambda: write_requests(
            sorted((mining / "retrieve").glob("*.parquet")),
            mining / "ingest" / "queries.parquet",
            mining / "ingest" / "pool.parquet",
            out / "requests",
            MiningConfig(),
            texts=False,
        ),
        "scores": lambda: attach_precomputed(
            sorted((out / "requests").glob("*.parquet")),
            out / "results",
            str(args.run / "inputs/scores.parquet"),
        ),
    }
    entry: dict = dict(label=args.label, run=str(args.run), date=time.strftime("%Y-%m-%d"))
    for phase, fn in phases.items():
        stop, peak = threading.Event(), [0.0]
        threading.Thread(target=largest_worker_mb, args=(stop, peak), daemon=True).start()
        start = time.perf_counter()
        fn()
        entry[phase] = {"seconds": round(time.perf_counter() - start, 1), "largest_worker_mb": round(peak[0])}
        stop.set()
        folder = FOLDERS[phase]
        ours = sorted((out / folder).glob("*.parquet"))
        same = sum(p.read_bytes() == (mining / "judge" / folder / p.name).read_bytes() for p in ours)
        entry[phase] |= {"files": len(ours), "files_equal_to_run": same}
    print(json.dumps(entry))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    results = [r for r in results if (r["label"], r["run"]) != (entry["label"], entry["run"])] + [entry]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
