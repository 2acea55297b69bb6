"""Mining stages alone on a finished `bench/scale.py` run: each phase reads the run's own inputs, writes
afresh, and its files are compared byte for byte with the run's. The A/B of a change to one stage at the
run's size, without the whole run.

Phases (`--phases`, in this order by default):
- `embed`: the import of the planted embeddings (`import_embeddings`);
- `requests`: the judge's request shards from the candidates (`write_requests`, ids only);
- `scores`: the planted scores joined onto the run's requests (`attach_precomputed`);
- `sample`: the hard negatives from the run's judge scores (`run_sample`; the files compared are
  hard_negatives.parquet, hard_negatives.json and quarantine.parquet).

    python bench/stages_alone.py /tmp/unime-scale/new-n662000 --out /tmp/alone-new
    # the code before a change, on the same run (a worktree of the old commit):
    PYTHONPATH=/tmp/unime-old python bench/stages_alone.py RUN --out /tmp/alone-old --label old

Measured per phase: wall seconds, the driver's peak RSS (this process's VmHWM, reset at the phase's
start, as `scale.py` measures a stage's: the phase alone, without what a whole run's driver keeps from
the stages before), and the peak RSS of the largest Ray worker (`scale.py`'s `/proc` reading of this
process's `ray::` workers, every 0.2 s; the work runs in tasks, so the driver's GIL does not stop the
sampler).
The settings are the run's (its config overrides, from its progress file). Results go to
`bench/results/stages_alone.json`, one entry per (label, run).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import threading
import time
from pathlib import Path

from scale import _reset_peak, _status_kb, sample  # bench/, this script's folder

import unime_ray
from unime_ray.config import load_config
from unime_ray.mining.embed import import_embeddings
from unime_ray.mining.judge import attach_precomputed, write_requests
from unime_ray.mining.sample import run_sample
from unime_ray.ray_utils import init_ray

RESULTS = Path(__file__).parent / "results" / "stages_alone.json"
SAMPLE_FILES = ["hard_negatives.parquet", "hard_negatives.json", "quarantine.parquet"]


def largest_worker_mb(stop: threading.Event, peak: list[float]) -> None:
    """Until `stop`: the largest RSS of this process's Ray workers (as `scale.py` measures a stage's),
    in MB, into peak[0]."""
    while not stop.wait(0.2):
        peak[0] = max(peak[0], sample(os.getpid())["worker"])


def phases(run: Path, out: Path) -> dict:
    """{phase: (the call, [(our file, the run's file)] once it ran)}."""
    start = next(json.loads(line) for line in (run / "progress.jsonl").open() if '"start"' in line)
    cfg = load_config(Path(unime_ray.__file__).parents[1] / "jobs/configs/tiny.yaml", start["overrides"])
    mining = run / "mining"
    queries, pool = mining / "ingest" / "queries.parquet", mining / "ingest" / "pool.parquet"

    def pairs(ours: Path, theirs: Path, names: list[str] | None = None) -> list[tuple[Path, Path]]:
        names = names or sorted(p.name for p in ours.glob("*.parquet"))
        return [(ours / name, theirs / name) for name in names]

    candidates = sorted((mining / "retrieve").glob("*.parquet"))
    requests = sorted((mining / "judge" / "requests").glob("*.parquet"))
    return {
        "embed": (
            lambda: import_embeddings(str(run / "inputs/embeddings.parquet"), queries, pool, out / "embed"),
            lambda: pairs(out / "embed", mining / "embed" / "results"),
        ),
        "requests": (
            lambda: write_requests(candidates, queries, pool, out / "requests", cfg.mining, texts=False),
            lambda: pairs(out / "requests", mining / "judge" / "requests"),
        ),
        "scores": (
            lambda: attach_precomputed(requests, out / "scores", str(run / "inputs/scores.parquet")),
            lambda: pairs(out / "scores", mining / "judge" / "results"),
        ),
        "sample": (
            lambda: run_sample(
                sorted((mining / "judge" / "results").glob("*.parquet")),
                queries,
                pool,
                out / "sample",
                cfg.mining,
                cfg.run.seed,
            ),
            lambda: pairs(out / "sample", mining / "sample", SAMPLE_FILES),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished bench/scale.py run folder")
    parser.add_argument("--out", type=Path, required=True, help="where the phases write (replaced)")
    parser.add_argument("--label", default="new", help="the code's name in the results")
    parser.add_argument("--phases", nargs="+", default=["embed", "requests", "scores", "sample"])
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    init_ray()
    entry: dict = dict(label=args.label, run=str(args.run), date=time.strftime("%Y-%m-%d %H:%M"))
    todo = phases(args.run, args.out)
    for phase in args.phases:
        call, files = todo[phase]
        stop, peak = threading.Event(), [0.0]
        threading.Thread(target=largest_worker_mb, args=(stop, peak), daemon=True).start()
        exact = _reset_peak()
        start = time.perf_counter()
        call()
        seconds = round(time.perf_counter() - start, 1)
        driver = round(_status_kb(os.getpid())["VmHWM"] / 1024) if exact else None  # before the compare
        stop.set()
        compared = files()
        same = sum(filecmp.cmp(ours, theirs, shallow=False) for ours, theirs in compared)  # in chunks
        entry[phase] = {
            "seconds": seconds,
            "driver_mb": driver,
            "largest_worker_mb": round(peak[0]),
        }
        entry[phase] |= {"files": len(compared), "files_equal_to_run": same}
        print(json.dumps({phase: entry[phase]}), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    results = [r for r in results if (r["label"], r["run"]) != (entry["label"], entry["run"])] + [entry]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
