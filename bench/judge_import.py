"""The bring-your-own judge-score import (`mining.judge.attach_precomputed`) alone, on a finished
`bench/scale.py` run: its judge request shards and planted scores in, fresh score files out, compared
file by file with the run's own judge output.

    python bench/judge_import.py /tmp/unime-scale/new-n662000 --out /tmp/ji-new
    # the code before a change, on the same run (a worktree of the old commit):
    PYTHONPATH=/tmp/unime-old python bench/judge_import.py RUN --out /tmp/ji-old --label old

Measured: wall seconds around the call, the peak RSS of the largest Ray worker (`ray::` processes of
this session, sampled every 0.2 s; the work runs in tasks, so the driver's GIL does not stop the
sampler), and how many output files equal the run's (`Table.equals`). Results go to
`bench/results/judge_import.json`, one entry per (label, run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from unime_ray.mining.judge import attach_precomputed
from unime_ray.ray_utils import init_ray

RESULTS = Path(__file__).parent / "results" / "judge_import.json"


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
    parser.add_argument("--out", type=Path, required=True, help="where the fresh score files go (replaced)")
    parser.add_argument("--label", default="new", help="the code's name in the results")
    args = parser.parse_args()
    judge = args.run / "mining" / "judge"
    requests = sorted((judge / "requests").glob("*.parquet"))
    shutil.rmtree(args.out, ignore_errors=True)
    init_ray()
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=largest_worker_mb, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = attach_precomputed(requests, args.out, str(args.run / "inputs" / "scores.parquet"))
    seconds = time.perf_counter() - start
    stop.set()
    same = sum(pq.read_table(args.out / p.name).equals(pq.read_table(judge / p.name)) for p in requests)
    entry = dict(
        label=args.label,
        run=str(args.run),
        date=time.strftime("%Y-%m-%d"),
        seconds=round(seconds, 1),
        largest_worker_mb=round(peak[0]),
        rows=report["rows"],
        files=len(requests),
        files_equal_to_run=int(same),
    )
    print(json.dumps(entry))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    results = [r for r in results if (r["label"], r["run"]) != (entry["label"], entry["run"])] + [entry]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
