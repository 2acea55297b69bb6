"""Chaos run of the whole pipeline: mine -> train-embed -> train-rerank -> eval -> build-index on the
synthetic world, each stage the project's own CLI command in a subprocess, while a seeded killer
SIGKILLs a random Ray worker process (actors and task workers) every `--interval` seconds, and the
driver itself is SIGKILLed once mid-mining and once mid-training; a command that dies is rerun, the
same command, until it succeeds. The outputs are then compared with a clean run of the same config.

    python bench/chaos.py --seeds 0 1 2 3 4          # the full version (a clean run, then one per seed)
    python bench/chaos.py --seeds 0 --quick          # the short version of tests/test_chaos.py

Checks, per seed: mining outputs equal (embeddings, candidates, every judge score and token count,
hard negatives byte for byte, the reports' counts) with every judge request scored exactly once; both
trainings at the clean run's final step (the steps redone after kills are counted) with equal final
weights; eval results and the index equal. Writes bench/results/chaos.json.

Victims: processes of this run's own local Ray (descendants of the driver; other Ray clusters on the
machine are never touched) titled `ray::...`, idle workers, Serve's controller and proxies and the
node's agents aside (SPARED); GCS and raylet are not titled so. Each command starts its own local
Ray on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from unime_ray.io import write_json

ROOT = Path(__file__).parents[1]
OUT = ROOT / "bench" / "results"
CLI = [sys.executable, "-m", "unime_ray.cli"]
# Not victims: idle workers (nothing to lose), Serve's controller and proxies, and the node's two agents,
# which the raylet fate-shares with (killing one is killing the node, not a worker).
SPARED = (
    "ray::IDLE",
    "ray::ServeController",
    "ray::ProxyActor",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)

# Small enough that a clean run of every stage takes minutes on 2 cores; judge shards of 2 queries so
# that kills land between finished and unfinished shards.
SETTINGS = (
    "data.datasets=[ShapesCLS, ShapesT2I]",
    "mining.top_n=10",
    "mining.judge_shard_queries=2",
    "mining.embed_shard_rows=32",
    "judge.model.batch_size=4",
    "train.steps=12",
    "train.checkpoint_every=4",
    "reranker.steps=12",
    "reranker.checkpoint_every=4",
    "tracking.enabled=false",
)
QUICK_QUERIES = 16
QUICK = (
    "data.datasets=[ShapesCLS]",
    "mining.judge_shard_queries=1",
    "mining.top_n=5",
    "train.steps=6",
    "train.checkpoint_every=3",
    "reranker.steps=6",
    "reranker.checkpoint_every=3",
)
STAGES = ("mine", "train-embed", "train-rerank", "eval", "build-index")


def overrides(run: Path, world: Path, models: Path, quick: bool) -> list[str]:
    """The tiny config moved to `run`, reading the shared world and models (built once, so both runs
    read the very same files)."""
    paths = [
        f"run.output_dir={run}",
        f"data.train_dir={world}/train",
        f"data.eval_dir={world}/eval",
        f"data.image_root={world}/images",
        *(
            f"{k}={models}"
            for k in ("embedder.path", "judge.model.path", "train.model.path", "reranker.model.path")
        ),
    ]
    return [*paths, *SETTINGS, *(QUICK if quick else ())]


def command(stage: str, run: Path, sets: list[str], world: Path) -> list[str]:
    """The CLI command of `stage` on `run`: eval and build-index take the run's own trained weights."""
    argv = [*CLI, stage, "--config", str(ROOT / "jobs/configs/tiny.yaml")]
    if stage in ("eval", "build-index"):
        argv += ["--run", str(run)]
    if stage == "build-index":
        argv += ["--corpus", str(world / "retrieval" / "captions.jsonl")]
    return argv + [a for s in sets for a in ("--set", s)]


def ray_workers(driver: int) -> list[psutil.Process]:
    """The killable Ray worker processes under `driver`: titled ray::..., not idle, not Serve's own."""
    try:
        procs = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            title = " ".join(p.cmdline())
            if title.startswith("ray::") and not title.startswith(SPARED):
                out.append(p)
    return out


class Killer:
    """A thread that, every uniform(lo, hi) seconds, SIGKILLs one random Ray worker of the current
    driver (a seeded choice among the workers sorted by title and pid; the moment, not the choice,
    depends on timing). Records each kill as (stage, title)."""

    def __init__(self, seed: int, lo: float, hi: float):
        self.rng, self.lo, self.hi = random.Random(seed), lo, hi
        self.driver: int | None = None
        self.stage = ""
        self.kills: list[dict] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.done.wait(self.rng.uniform(self.lo, self.hi)):
            if self.driver is None:
                continue
            victims = sorted(ray_workers(self.driver), key=lambda p: (" ".join(p.cmdline()), p.pid))
            if not victims:
                continue
            victim = self.rng.choice(victims)
            with contextlib.suppress(psutil.Error):
                title = " ".join(victim.cmdline())[:80]
                victim.send_signal(signal.SIGKILL)
                self.kills.append(
                    {"stage": self.stage, "victim": title, "t": round(time.monotonic() - t0, 1)}
                )

    def __enter__(self) -> Killer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever the command left (its local Ray: GCS, raylet, workers), as a rerun on a new
    local Ray would not reuse them; the command ran in its own session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def progress(stage: str, run: Path) -> Callable[[], bool]:
    """When to kill the driver: mining once some judge shards are done and most are not, training once
    its first checkpoint is written and steps after it have run."""
    if stage == "mine":
        results, requests = run / "mining/judge/results", run / "mining/judge/requests/_COMPLETE"

        def ready() -> bool:
            if not requests.is_file():
                return False
            done = len(list(results.glob("*.parquet")))
            return 3 <= done < len(requests.read_text().split()) // 2

        return ready
    metrics = run / f"train_{stage.removeprefix('train-')}" / "metrics.jsonl"

    def trained() -> bool:
        if not metrics.is_file():
            return False
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
        return bool(steps) and max(steps) >= 5

    return trained


def run_stage(
    stage: str,
    argv: list[str],
    run: Path,
    killer: Killer | None,
    kill_driver: bool,
    log: Path,
    timeout: float,
) -> dict:
    """Run `argv` until it exits 0 (at most 10 attempts); with `kill_driver`, SIGKILL the driver once,
    when `progress` says so (in whichever attempt gets there). Returns attempts, driver kills, hangs,
    seconds, and the last log line of each attempt that failed on its own (not killed by us)."""
    start, attempts, driver_kills, hangs, failures = time.monotonic(), 0, 0, 0, []
    ready = progress(stage, run) if kill_driver else None
    while True:
        attempts += 1
        if attempts > 10:
            raise RuntimeError(f"{stage}: no success in 10 attempts; see {log}")
        with log.open("a") as f:
            f.write(f"\n===== {stage} attempt {attempts}\n")
            f.flush()
            offset = f.tell()
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        if killer:
            killer.driver, killer.stage = proc.pid, stage
        began, ours = time.monotonic(), False
        while proc.poll() is None:
            if ready is not None and ready():
                proc.send_signal(signal.SIGKILL)
                driver_kills, ready, ours = driver_kills + 1, None, True
            elif time.monotonic() - began > timeout:
                hangs, ours = hangs + 1, True
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.2)
        if killer:
            killer.driver = None
        kill_group(proc)
        if proc.returncode == 0:
            break
        if not ours:
            with log.open() as f:
                f.seek(offset)
                lines = [line.strip() for line in f.read().splitlines() if line.strip()]
            failures.append(lines[-1][:200] if lines else f"exit {proc.returncode}, no output")
    return {
        "attempts": attempts,
        "driver_kills": driver_kills,
        "hangs": hangs,
        "failures": failures,
        "seconds": round(time.monotonic() - start, 1),
    }


def pipeline(
    run: Path,
    sets: list[str],
    world: Path,
    stages: tuple[str, ...],
    killer: Killer | None,
    kill_in: set[str],
    timeout: float,
) -> dict:
    """`stages` in order on a fresh `run`; returns each stage's attempts, driver kills and seconds."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    log = run.parent / f"{run.name}.log"
    log.unlink(missing_ok=True)
    return {
        s: run_stage(s, command(s, run, sets, world), run, killer, s in kill_in, log, timeout) for s in stages
    }


# ---------------------------------------------------------------- comparisons


def _table(files: list[Path], drop: tuple[str, ...] = ()) -> pa.Table:
    t = pa.concat_tables([pq.read_table(f) for f in files])
    return t.drop_columns([c for c in drop if c in t.column_names])


def _same_files(a: Path, b: Path, pattern: str, drop: tuple[str, ...] = ()) -> bool:
    """The Parquet files matching `pattern` under a and b: same names, equal tables (columns `drop` aside)."""
    fa, fb = sorted(a.glob(pattern)), sorted(b.glob(pattern))
    if [f.name for f in fa] != [f.name for f in fb] or not fa:
        return False
    return all(_equal(_table([x], drop), _table([y], drop)) for x, y in zip(fa, fb, strict=True))


def _equal(x: pa.Table, y: pa.Table) -> bool:
    """Equal tables, where a NaN equals a NaN: Arrow's `equals` says NaN != NaN, and the judge requests of
    positives carry a NaN `sim` (they were not retrieved), so it would call any two runs different."""
    if x.schema != y.schema or x.num_rows != y.num_rows:
        return False
    for cx, cy in zip(x.columns, y.columns, strict=True):
        if not pa.types.is_floating(cx.type):
            if not cx.equals(cy):
                return False
        elif not cx.is_null().equals(cy.is_null()) or not np.array_equal(
            cx.to_numpy(zero_copy_only=False), cy.to_numpy(zero_copy_only=False), equal_nan=True
        ):
            return False
    return True


# Report entries that say how a run went (time, work done in this attempt), not what it produced.
RUN_KEYS = {
    "seconds",
    "rows_per_s",
    "calls_per_s",
    "shards_done_before",
    "parts_done_before",
    "rows",
    "node",
    "nodes",
}


def counts(report: dict) -> dict:
    """A stage report without its run-dependent entries (RUN_KEYS), recursively."""
    return {k: counts(v) if isinstance(v, dict) else v for k, v in report.items() if k not in RUN_KEYS}


def exactly_once(run: Path) -> bool:
    """Every judge request of the run has exactly one score, and no score lacks a request."""
    keys = ["query_id", "cand_id"]
    req = _table(sorted((run / "mining/judge/requests").glob("*.parquet"))).select(keys)
    got = _table(sorted((run / "mining/judge/results").glob("*.parquet"))).select(keys)
    unique = got.group_by(keys).aggregate([]).num_rows
    same = req.sort_by([(k, "ascending") for k in keys]).equals(got.sort_by([(k, "ascending") for k in keys]))
    return unique == got.num_rows == req.num_rows and same


def _report(run: Path, stage: str) -> dict:
    """A mining stage's report as `counts` has it, its run folder written as "<run>" (the sample report
    lists the score files it read by path)."""
    text = (run / "mining" / stage / "_SUCCESS.json").read_text().replace(str(run), "<run>")
    return counts(json.loads(text)["report"])


def compare_mining(a: Path, b: Path) -> dict:
    m, n = a / "mining", b / "mining"
    reports = {s: _report(a, s) == _report(b, s) for s in ("ingest", "embed", "retrieve", "judge", "sample")}
    hn = ("hard_negatives.parquet", "hard_negatives.json")  # report.json names its run's files: above
    return {
        "embeddings": _same_files(m / "embed", n / "embed", "results/*.parquet"),
        "candidates": _same_files(m / "retrieve", n / "retrieve", "*.parquet"),
        "judge_scores": _same_files(m / "judge", n / "judge", "results/*.parquet", drop=("seconds",)),
        "hard_negatives_bytes": all(
            (m / "sample" / f).read_bytes() == (n / "sample" / f).read_bytes() for f in hn
        ),
        "report_counts": all(reports.values()),
        "report_counts_by_stage": reports,
        "judged_exactly_once": exactly_once(b),
    }


def _weights(summary: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(Path(summary["weights"]).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def compare_training(a: Path, b: Path, kind: str) -> dict:
    sa = json.loads((a / f"train_{kind}/_SUCCESS.json").read_text())["summary"]
    sb = json.loads((b / f"train_{kind}/_SUCCESS.json").read_text())["summary"]
    wa, wb = _weights(sa), _weights(sb)
    equal = wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    diff = max((float(np.abs(wa[k] - wb[k]).max()) for k in wa if k in wb), default=float("nan"))
    logged = [json.loads(line)["step"] for line in Path(sb["metrics_path"]).read_text().splitlines()]
    logged = [s for s in logged if s > 0]  # step 0: the untrained model's figures, logged once per start
    return {
        "final_step": sb["metrics"]["step"],
        "same_final_step": sa["metrics"]["step"] == sb["metrics"]["step"],
        "steps_redone": len(logged) - len(set(logged)),
        "weights_equal": equal,
        "weights_max_abs_diff": diff,
    }


def compare_eval(a: Path, b: Path) -> dict:
    ra, rb = (json.loads((r / "eval/results.json").read_text()) for r in (a, b))
    return {"table3_equal": ra.get("table3") == rb.get("table3"), "scores_equal": _scores(ra) == _scores(rb)}


def _scores(results: dict) -> dict:
    """The figures of an eval results file: per-dataset tables and Table 3 (not its paths, read counts
    or cache use, which a resumed run changes by design)."""
    return {k: results.get(k) for k in ("mmeb", "retrieval", "compositional", "table3")}


def compare_index(a: Path, b: Path) -> dict:
    ia, ib = (
        sorted(p for p in (r / "index").rglob("*") if p.is_file() and p.suffix != ".json") for r in (a, b)
    )
    names = [p.relative_to(a / "index") for p in ia] == [p.relative_to(b / "index") for p in ib]
    return {
        "files": [str(p.relative_to(a / "index")) for p in ia],
        "identical": bool(ia)
        and names
        and all(x.read_bytes() == y.read_bytes() for x, y in zip(ia, ib, strict=True)),
    }


def compare(clean: Path, chaos: Path, stages: tuple[str, ...]) -> dict:
    """Every check of the stages run, chaos run against clean run; "outcome" sums them up. Eval and the
    index depend on the trained weights: their outcome is None (not comparable) where the weights they
    use differ from the clean run's."""
    checks: dict = {}
    if "mine" in stages:
        m = checks["mining"] = compare_mining(clean, chaos)
        checks["outcome"] = {"mining_equal": all(m[k] for k in m if k != "report_counts_by_stage")}
    trained = [k for k in ("embed", "rerank") if f"train-{k}" in stages]
    for kind in trained:
        checks[f"train_{kind}"] = compare_training(clean, chaos, kind)
    if trained:
        checks["outcome"]["final_steps_equal"] = all(checks[f"train_{k}"]["same_final_step"] for k in trained)
        checks["outcome"]["weights_equal"] = all(checks[f"train_{k}"]["weights_equal"] for k in trained)
    same = {k: checks.get(f"train_{k}", {}).get("weights_equal", False) for k in ("embed", "rerank")}
    if "eval" in stages:  # the trained embedder and reranker
        checks["eval"] = compare_eval(clean, chaos)
        checks["outcome"]["eval_equal"] = checks["eval"]["scores_equal"] if all(same.values()) else None
    if "build-index" in stages:  # the trained embedder
        checks["index"] = compare_index(clean, chaos)
        checks["outcome"]["index_equal"] = checks["index"]["identical"] if same["embed"] else None
    return checks


def chaos_run(
    seed: int,
    base: Path,
    sets: Callable[[Path], list[str]],
    world: Path,
    stages: tuple[str, ...],
    interval: tuple[float, float],
    timeout: float,
    clean_done: Path,
) -> dict:
    """One seed: the pipeline under the killer, the driver killed in mining and in one training (the
    seed picks which), then compared with the clean run in `base/clean`."""
    rng = random.Random(seed)
    trainings = [s for s in stages if s.startswith("train-")]
    kill_in = {"mine"} & set(stages) | ({rng.choice(trainings)} if trainings else set())
    run = base / f"chaos-{seed}"
    with Killer(seed, *interval) as killer:
        done = pipeline(run, sets(run), world, stages, killer, kill_in, timeout)
    for s, r in done.items():
        r["worker_kills"] = sum(k["stage"] == s for k in killer.kills)
    while not clean_done.is_file():  # a concurrent call's clean run (--reuse-clean) still going
        time.sleep(5)
    return {
        "seed": seed,
        "driver_killed_in": sorted(kill_in),
        "stages": done,
        "kills": killer.kills,
        "checks": compare(base / "clean", run, stages),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--quick", action="store_true", help="the short version: fewer training steps")
    p.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="a prefix of the pipeline"
    )
    p.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=(10.0, 30.0),
        metavar=("LO", "HI"),
        help="seconds between worker kills: uniform in [LO, HI]",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before an attempt counts as hung")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "chaos", help="scratch folder")
    p.add_argument("--out", type=Path, default=OUT / "chaos.json", help="results (seeds merged into it)")
    p.add_argument(
        "--reuse-clean",
        action="store_true",
        help="compare with the clean run of an earlier or concurrent call on the same --work (waits for it)",
    )
    p.add_argument("--recheck", action="store_true", help="only redo the comparisons of the seeds in --out")
    a = p.parse_args(argv)
    stages = STAGES[: len(a.stages)]
    if a.recheck:
        result = json.loads(a.out.read_text())
        for one in result["seeds"]:
            one["checks"] = compare(a.work / "clean", a.work / f"chaos-{one['seed']}", tuple(one["stages"]))
        write_json(result, a.out)
        return result
    if tuple(a.stages) != stages:
        p.error(f"--stages must be a prefix of {' '.join(STAGES)}")
    from unime_ray.assets import prepare_synthetic
    from unime_ray.config import load_config
    from unime_ray.data.synthetic import make_world

    world, models = a.work / "world", a.work / "models" / "qwen2-vl"

    def sets(run: Path) -> list[str]:
        return overrides(run, world, models, a.quick)

    if a.quick and not (world / "world.json").is_file():  # 16 training queries per dataset, not 48
        make_world(world, seed=0, n_train=QUICK_QUERIES)
    prepare_synthetic(load_config(ROOT / "jobs/configs/tiny.yaml", sets(a.work / "clean")))
    clean_file = a.work / "clean.json"
    if not a.reuse_clean:
        clean = pipeline(a.work / "clean", sets(a.work / "clean"), world, stages, None, set(), a.timeout)
        write_json(clean, clean_file)
    old = json.loads(a.out.read_text()) if a.reuse_clean and a.out.is_file() else {}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores",
        "settings": [*SETTINGS, *(QUICK if a.quick else ())],
        "interval_s": list(a.interval),
        "seeds": [s for s in old.get("seeds", []) if s["seed"] not in a.seeds],
    }
    for seed in a.seeds:
        one = chaos_run(seed, a.work, sets, world, stages, tuple(a.interval), a.timeout, clean_file)
        result["clean"] = clean = json.loads(clean_file.read_text())
        lost = sum(s["seconds"] for s in one["stages"].values()) - sum(s["seconds"] for s in clean.values())
        one["seconds_lost"] = round(lost, 1)
        result["seeds"] = sorted([*result["seeds"], one], key=lambda s: s["seed"])
        write_json(result, a.out)
        print(
            json.dumps({k: one[k] for k in ("seed", "seconds_lost")} | one["checks"]["outcome"]), flush=True
        )
    return result


if __name__ == "__main__":
    main()
