"""Run the kill/resume tests again and again, each time in a fresh temporary folder, and count how often
each passes: a flake that shows once in three runs shows here, with its output kept.

    nice -n 10 python bench/kill_loop.py --runs 20
    python bench/kill_loop.py --runs 3 --tests tests/test_tasks.py tests/test_runlock.py

A run whose Ray did not start (on a machine shared by many jobs, "The current node timed out during
startup") tested nothing: it is counted apart, as `ray_did_not_start`, not as a failure of the tests.
`--max-load L` waits before each run until the 1-minute load average is below L (0: never waits).

Each run is one pytest process over all the selected tests (they share its session fixtures, as in CI),
with `--basetemp` a new folder, so no run sees another's outputs. Per-test outcomes come from pytest's
JUnit XML. The tally goes to `bench/results/kill_loop.json` after every run (atomically, so a stopped
loop keeps what it counted); a failing run's whole console output is kept beside it as
`kill_loop-run<i>.log`, and its temporary folder is kept too (its path is in the tally) to read the
stage outputs it left. Passing runs' folders are removed."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unime_ray.io import write_json  # noqa: E402

# The tests that kill something (a Ray task, an actor, a training worker, a whole job, a lock holder)
# and check that the work is resumed with nothing lost or done twice.
KILL_TESTS = (
    "tests/test_mine_job.py::test_killed_judge_worker_is_replaced_and_every_pair_judged_once",
    "tests/test_mine_job.py::test_killed_job_resumes_with_every_pair_judged_exactly_once",
    "tests/test_tasks.py::test_every_item_once_and_a_killed_task_is_run_again",
    "tests/test_shards.py::test_all_rows_once_and_resume_skips_finished_shards",
    "tests/test_runlock.py",
)
RAY_START_FAILED = "The current node timed out during startup"
# Not by default, a Ray Train + DeepSpeed start costing ~100 s a run: to loop the killed training worker
# too, add tests/test_train.py::test_killed_worker_resumes_from_checkpoint_and_rerun_continues to --tests.


def outcomes(junit: Path) -> dict[str, dict]:
    """Test id -> {"outcome": "passed" | "failed" | "error" | "skipped", "seconds": its call's time},
    read from a pytest JUnit XML file."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        result[name] = {
            "outcome": {"failure": "failed"}.get(outcome, outcome),
            "seconds": float(case.get("time")),
        }
    return result


def run_once(tests: list[str], index: int, results: Path, max_load: float) -> dict:
    """One pytest process over `tests` in a fresh folder, once the load is below `max_load`; its per-test
    outcomes, wall seconds, the seconds waited for the load, and whether its Ray failed to start."""
    waited = 0
    while max_load and os.getloadavg()[0] >= max_load:
        time.sleep(10)
        waited += 10
    tmp = Path(tempfile.mkdtemp(prefix=f"kill-loop-{index}-"))
    junit = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp / 'pytest'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run(
        [*cmd, f"--junitxml={junit}", *tests], cwd=ROOT, env=env, capture_output=True, text=True
    )
    run = {"run": index, "returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1)}
    run |= {"waited_for_load_s": waited, "ray_did_not_start": RAY_START_FAILED in proc.stdout + proc.stderr}
    run["tests"] = outcomes(junit) if junit.exists() else {}
    if proc.returncode == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log = results.parent / f"{results.stem}-run{index}.log"
        log.write_text(proc.stdout + proc.stderr)
        run |= {"log": str(log), "tmp": str(tmp)}
    return run


def tally(runs: list[dict]) -> dict[str, dict[str, int]]:
    """Per test, how many runs it passed, failed, errored or skipped in."""
    counts: dict[str, dict[str, int]] = {}
    for run in runs:
        for name, test in run["tests"].items():
            per = counts.setdefault(name, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
            per[test["outcome"]] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--tests", nargs="+", default=list(KILL_TESTS), help="pytest node ids or files")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/kill_loop.json")
    p.add_argument("--max-load", type=float, default=0.0, help="wait for a 1-minute load average below it")
    args = p.parse_args()
    runs: list[dict] = []
    for i in range(1, args.runs + 1):
        run = run_once(args.tests, i, args.results, args.max_load)
        runs.append(run)
        failed = sorted(t for t, o in run["tests"].items() if o["outcome"] not in ("passed", "skipped"))
        status = "ok" if run["returncode"] == 0 else f"FAILED {failed or run['returncode']} ({run['log']})"
        status += ", Ray did not start" if run["ray_did_not_start"] else ""
        print(f"run {i}/{args.runs}: {run['seconds']} s, {status}", flush=True)
        summary = {
            "runs": len(runs),
            "runs_passed": sum(r["returncode"] == 0 for r in runs),
            "runs_ray_did_not_start": sum(r["ray_did_not_start"] for r in runs),
            "tests": tally(runs),
            "detail": runs,
        }
        write_json({"command": sys.argv[1:], **summary}, args.results)
    print(f"{summary['runs_passed']}/{summary['runs']} runs passed; tally in {args.results}")


if __name__ == "__main__":
    main()
