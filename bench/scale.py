"""Model-free scale harness for the mining pipeline: how time, memory and disk grow
with the number of MMEB-train pairs, with no model anywhere, on a laptop-sized machine.

    python bench/scale.py --n 20000                        # this tree's code, label "new"
    python bench/scale.py --n 2000 --dim 64 --out /tmp/s  # a quick check
    # approximate retrieval on planted vectors with neighbourhoods, its recall checked against exact search
    python bench/scale.py --n 662000 --topics 16 --set mining.index=ivf --set mining.ivf_nprobe=8
    # the baseline, the code before the rework (old code: no precomputed embedder, so the harness
    # writes the embed stage's output itself):
    git worktree add /tmp/unime-old 72b41fa
    PYTHONPATH=/tmp/unime-old python bench/scale.py --n 100000 --label old
    PYTHONPATH=/tmp/unime-old python bench/scale.py --n 662000 --label old --max-rss-gb 16 --timeout-min 40

What one run does (`bench/scale_data.py` writes every input and documents the data's shape):

1. Generates N MMEB-train shaped pairs over 20 datasets (a separate process, reused by later runs with
   the same N and seed): one JSONL file per dataset plus 16 tiny images.
2. Starts the job, a child process running the real pipeline (`run_mining(cfg, stages=(stage,))` once per
   stage, in order, so each call runs exactly one new stage) with `jobs/configs/tiny.yaml` plus overrides:
   the generated data, `data.check_images=false` (opening every image is I/O this bench is not about; the
   reader still checks that every image file exists), `mining.top_n=50`, and the precomputed embedding
   and judge backends. Their inputs are written between stages by `scale_data.py` processes from the
   stage outputs, since ids exist only after ingest and judge requests only after retrieve: planted
   embeddings (concept clusters, so retrieval has real neighbours and false negatives) after ingest,
   planted judge scores (positive ~0.9, false negatives within beta, 0.5% fallback queries) after
   retrieve. With code that has no `embedder.backend` (the code before the rework) the harness writes the
   embed stage's output itself: EMBEDDINGS shards plus the `_SUCCESS.json` marker carrying the code's own
   fingerprint, so that code's `run_mining` skips embed and goes on; such runs say so in `mode`.
3. Reads the mined rows once the way training does (`train/rows.py`: into the object store, then one
   epoch's micro-batches).

Measured per stage: wall seconds (inside the job, around the `run_mining` call), the job's peak RSS
(exact: VmHWM, reset per stage through /proc/self/clear_refs), the peak RSS of the largest Ray worker
(`ray::` processes under the job, agents excluded), rows from the stage report, and bytes under
`mining/<stage>/`. The sampling runs every 0.5 s in THIS process, not in a thread of the job: the job
spends its heavy moments inside Arrow calls that hold the GIL (`Table.from_pylist`, `to_pylist`), where a
thread would neither sample nor be able to stop it. For the same reason the watchdogs live here:
`--max-rss-gb` kills the job and every process under it when their summed RSS (shared memory, i.e. Ray's
object store, left out: it is capped by Ray and counted by every process that maps it) passes the limit,
`--timeout-min` when the job has run that long; the result then records the stage, the time and the RSS.

Results go to `bench/results/scale.json`, one entry per (label, n), replaced on a rerun; the console
gets one line per stage and a markdown table at the end. The exit code is 0 only for a run that
finished (a killed or failed run is still recorded). Everything runs on 127.0.0.1 (`init_ray`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_SCRIPT = Path(__file__).resolve().with_name("scale_data.py")
RESULTS = ROOT / "bench" / "results" / "scale.json"
TICK = 0.5  # seconds between /proc samples
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's per-node daemons, not workers
MB = 1 << 20


# ---- /proc sampling (no psutil needed) ----------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # the process exited between listing and reading
        return ""


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


def descendants(root: int) -> dict[int, str]:
    """pid -> cmdline of every process under `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read(f"/proc/{entry.name}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces: split after ")"
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
        todo += children.get(pid, [])
    return found


def sample(job: int) -> dict[str, float]:
    """One look at the job: its RSS, its largest Ray worker, helpers, and the summed non-shared RSS."""
    own = _status_kb(job)
    out = {"driver": own.get("VmRSS", 0) / 1024, "worker": 0.0, "ray": 0.0, "helper": 0.0}
    total = own.get("VmRSS", 0) - own.get("RssShmem", 0)
    for pid, cmd in descendants(job).items():
        kb = _status_kb(pid)
        rss = kb.get("VmRSS", 0)
        total += rss - kb.get("RssShmem", 0)
        if "scale_data.py" in cmd:
            out["helper"] = max(out["helper"], rss / 1024)
            continue
        out["ray"] += rss / 1024
        if cmd.startswith("ray::") and not cmd.startswith(AGENTS):
            out["worker"] = max(out["worker"], rss / 1024)
    out["total"] = total / 1024
    return out


def kill_tree(job: int) -> None:
    """SIGKILL the job and every process under it (we started all of them), children first."""
    for pid in [*descendants(job), job]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- the job (child process) --------------------------------------------------------------------------


def _emit(progress: Path, event: str, **fields) -> None:
    with progress.open("a") as f:
        f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so each stage's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _stage_rows(stage: str, report: dict) -> dict:
    """The few counts of a stage report worth a column."""
    if stage == "ingest":
        return {"queries": report.get("queries"), "pool": report.get("pool")}
    if stage == "retrieve":
        per = [v for v in report.values() if isinstance(v, dict)]
        return {"candidates": sum(v.get("candidates", 0) for v in per)}
    if stage == "sample":
        return {k: report.get(k) for k in ("queries_out", "fallback", "queries_quarantined")}
    return {"rows": report.get("rows")}


def _helper(args: list[str], log) -> dict:
    """Run `scale_data.py` in its own process (its memory is not the job's); its last line is JSON."""
    done = subprocess.run(
        [sys.executable, str(DATA_SCRIPT), *args], stdout=subprocess.PIPE, stderr=log, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    out = Path(args[args.index("--out") + 1])
    return {**result, "bytes": _dir_bytes(out) if out.is_dir() else out.stat().st_size}


def recall_at_top_n(mining: Path, embeddings: Path, cfg, n: int, seed: int) -> dict:
    """How much of exact search an approximate retrieve stage kept: for `n` queries drawn at random
    (seeded), the share of their exact top_n candidates (the same `retrieve_candidates`, index="exact",
    over the query's whole dataset pool) that the stage's output holds. Mean over the queries, and the
    lowest mean of a dataset."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from unime_ray.mining.retrieve import _matrix, _positives, dataset_embeddings, retrieve_candidates

    queries = pq.read_table(mining / "ingest" / "queries.parquet", columns=["id", "dataset", "pos_id"])
    pick = np.random.default_rng(seed).choice(queries.num_rows, size=min(n, queries.num_rows), replace=False)
    drawn = queries.take(np.sort(pick))
    per_query: list[float] = []
    per_dataset: dict[str, float] = {}
    for name in sorted(pc.unique(drawn["dataset"]).to_pylist()):
        mine = drawn.filter(pc.equal(drawn["dataset"], name))
        query_rows, pool = dataset_embeddings(str(embeddings), name)
        asked = query_rows.filter(pc.is_in(query_rows["id"], value_set=mine["id"]))
        exact = retrieve_candidates(
            asked["id"].to_numpy(),
            _matrix(asked, name, None),
            _positives(asked["id"], mine, name),
            pool["id"].to_numpy(),
            _matrix(pool, name, None),
            top_n=cfg.mining.top_n,
            delta=cfg.mining.delta,
            dataset=name,
        )
        found = pq.read_table(
            mining / "retrieve" / f"{name}.parquet",
            columns=["query_id", "cand_id"],
            filters=[("query_id", "in", mine["id"].to_pylist())],
        )
        kept = set(zip(found["query_id"].to_pylist(), found["cand_id"].to_pylist(), strict=True))
        wanted: dict[str, list[str]] = {}
        for q, c in zip(exact["query_id"].to_pylist(), exact["cand_id"].to_pylist(), strict=True):
            wanted.setdefault(q, []).append(c)
        shares = [sum((q, c) in kept for c in cs) / len(cs) for q, cs in wanted.items()]
        per_query += shares
        per_dataset[name] = round(float(np.mean(shares)), 4)
    return {
        "recall": round(float(np.mean(per_query)), 4),
        "recall_queries": len(per_query),
        "recall_lowest_dataset": min(per_dataset.items(), key=lambda kv: kv[1]),
    }


def job(
    run: Path,
    data: Path,
    dim: int,
    seed: int,
    progress: Path,
    sets: list[str],
    until: str,
    recall_n: int,
    topics: int,
) -> None:
    """The driver: the real pipeline, stage by stage, each bracketed by progress events; `sets` are
    extra config overrides (e.g. an approximate index), `until` the last phase to run (a stage, or
    "read": the training read after sample), `topics` the planted embeddings' concepts per topic (0:
    flat)."""
    import unime_ray
    from unime_ray.config import Config, load_config
    from unime_ray.mining.pipeline import STAGES, fingerprints, run_mining
    from unime_ray.ray_utils import init_ray
    from unime_ray.train.rows import TrainRows, read_rows

    code = Path(unime_ray.__file__).resolve().parents[1]
    # The code before the rework has no precomputed embedder (EmbedderConfig did not exist).
    old = "backend" not in {f.name for f in dataclasses.fields(type(Config().embedder))}
    inputs, mining = run / "inputs", run / "mining"
    overrides = [
        f"run.output_dir={run}",
        f"data.train_dir={data / 'train'}",
        f"data.image_root={data / 'images'}",
        "data.synthetic=false",
        "data.check_images=false",
        "mining.top_n=50",
        "judge.backend=precomputed",
        f"judge.scores_path={inputs / 'scores.parquet'}",
        *sets,
    ]
    if not old:
        overrides += [
            "embedder.backend=precomputed",
            f"embedder.embeddings_path={inputs / 'embeddings.parquet'}",
        ]
    cfg = load_config(code / "jobs" / "configs" / "tiny.yaml", overrides)
    mode = (
        "old code; embed stage written by the harness" if old else "precomputed embeddings and judge scores"
    )
    _emit(progress, "start", mode=mode, code=str(code), overrides=overrides, pid=os.getpid())
    log = sys.stderr
    state = {"phase": "ray_start"}

    def measured(phase: str, fn, **extra) -> dict:
        state["phase"] = phase
        _emit(progress, "phase", phase=phase)
        exact = _reset_peak()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peak = _status_kb(os.getpid())
        figures = {f"helper_{k}" if k == "seconds" else k: v for k, v in (result or {}).items()}
        figures |= {
            "seconds": round(seconds, 2),
            "driver_peak_mb": round((peak["VmHWM"] if exact else 0) / 1024, 1),
            "driver_end_mb": round(peak["VmRSS"] / 1024, 1),
            **extra,
        }
        _emit(progress, "done", phase=phase, **figures)
        return result

    try:
        measured("ray_start", lambda: init_ray() and None)
        for stage in STAGES:
            if stage == "embed":
                args = [
                    "embeddings",
                    "--ingest",
                    str(mining / "ingest"),
                    "--dim",
                    str(dim),
                    "--seed",
                    str(seed),
                    "--topics",
                    str(topics),
                ]
                if old:  # the old code's embed output: embed/results/*.parquet, plus its marker below
                    args += ["--shards", "--out", str(mining / "embed" / "results")]
                else:
                    args += ["--out", str(inputs / "embeddings.parquet")]
                made = measured("prep_embeddings", lambda a=args: _helper(a, log))
                if old:
                    # The marker the old run_mining accepts as "embed done": its own fingerprint.
                    embed_print = fingerprints(cfg)["embed"]
                    report = {
                        "rows": made["rows"],
                        "seconds": made["seconds"],
                        "written_by": "bench/scale.py",
                    }
                    (mining / "embed" / "_FINGERPRINT").write_text(embed_print)
                    marker = {"fingerprint": embed_print, "report": report}
                    (mining / "embed" / "_SUCCESS.json").write_text(json.dumps(marker))
            if stage == "judge":
                measured(
                    "prep_scores",
                    lambda: _helper(
                        [
                            "scores",
                            *("--ingest", str(mining / "ingest"), "--retrieve", str(mining / "retrieve")),
                            *("--out", str(inputs / "scores.parquet"), "--top-n", "50", "--seed", str(seed)),
                        ],
                        log,
                    ),
                )

            def one(stage: str = stage) -> dict:
                report = run_mining(cfg, stages=(stage,))[stage]
                figures = {"bytes": _dir_bytes(mining / stage), **_stage_rows(stage, report)}
                if stage == "judge":
                    requests = sorted((mining / "judge" / "requests").glob("*.parquet"))
                    import pyarrow.parquet as pq

                    n = sum(pq.ParquetFile(p).metadata.num_rows for p in requests)
                    size = sum(p.stat().st_size for p in requests)
                    figures |= {
                        "requests": n,
                        "request_bytes": size,
                        "request_bytes_per_1m": round(size / max(n, 1) * 1e6),
                    }
                return figures

            measured(stage, one, harness_written=(old and stage == "embed"))
            if stage == "retrieve" and cfg.mining.index != "exact" and recall_n:
                embeddings = mining / "embed" / "results"
                measured("recall", lambda e=embeddings: recall_at_top_n(mining, e, cfg, recall_n, seed))
            if stage == until:
                break

        def read_epoch() -> dict:
            path = str(mining / "sample" / "hard_negatives.parquet")
            rows, read = TrainRows(read_rows(path), path), 0
            # As a training worker of one reads: an epoch's micro-batches as rows, the last partial dropped.
            for batch in rows.epoch(cfg.run.seed, 0, 1, 0, cfg.train.micro_batch_size):
                read += len(batch)
            return {"rows": read, "bytes": _dir_bytes(mining / "sample" / "hard_negatives.parquet")}

        if until == "read":
            measured("train_read", read_epoch)
        _emit(progress, "end")
    except Exception as error:
        _emit(progress, "error", phase=state["phase"], error=f"{type(error).__name__}: {error}"[:2000])
        traceback.print_exc()
        sys.exit(1)


# ---- the harness (this process) ------------------------------------------------------------------------


def generate(n: int, seed: int, out: Path) -> dict:
    """The pairs for (n, seed), generated once into `out` and reused (stamp file)."""
    stamp = out / "stamp.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, str(DATA_SCRIPT), "pairs", "--n", str(n), "--out", str(out), "--seed", str(seed)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    made = json.loads(done.stdout.strip().splitlines()[-1])
    made |= {"n": n, "seed": seed, "bytes": _dir_bytes(out)}
    stamp.write_text(json.dumps(made))
    return made


def _ram_gb() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return 0.0


def _git_commit(path: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "unime_ray"], capture_output=True, text=True
    )
    return done.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


ROW_KEYS = ("queries", "pool", "candidates", "rows", "queries_out", "fallback", "recall")


def _line(phase: str, f: dict) -> str:
    rows = " ".join(f"{k}={v}" for k, v in f.items() if k in ROW_KEYS)
    return (
        f"[scale] {phase:<16} {f.get('seconds', 0):8.1f} s  driver {f.get('driver_peak_mb', 0):7.0f} MB  "
        f"worker {f.get('worker_peak_mb', 0):6.0f} MB  {f.get('bytes', 0) / MB:8.1f} MB written  {rows}"
    )


def table(record: dict) -> str:
    """A markdown table of the run, one row per stage (prep_*: the harness writing the stage's inputs)."""
    lines = [
        f"{record['label']}, n={record['n']} ({record['mode']}; {record['status']})",
        "",
        "| stage | seconds | driver peak MB | worker peak MB | rows | MB written |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for phase, f in record["stages"].items():
        rows = ", ".join(f"{k} {v}" for k, v in f.items() if k in ROW_KEYS)
        name = f"{phase} (harness)" if f.get("harness_written") or phase.startswith("prep") else phase
        lines.append(
            f"| {name} | {f.get('seconds', '-')} | {f.get('driver_peak_mb', '-')} "
            f"| {f.get('worker_peak_mb', '-')} | {rows} | {round(f.get('bytes', 0) / MB, 1)} |"
        )
    return "\n".join(lines)


def stage_progress(run: Path, phase: str) -> dict:
    """How far a killed stage got: Parquet files and bytes in each folder of its output."""
    folder = run / "inputs" if phase.startswith("prep") else run / "mining" / phase
    if not folder.is_dir():
        return {}
    files = {}
    for path in folder.rglob("*.parquet"):
        key = str(path.parent.relative_to(folder))
        files[key] = files.get(key, 0) + 1
    return {"parquet_files": files, "bytes": _dir_bytes(folder)}


def save(record: dict, path: Path) -> None:
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [r for r in runs if (r["label"], r["n"]) != (record["label"], record["n"])] + [record]
    runs.sort(key=lambda r: (r["label"], r["n"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


def harness(args: argparse.Namespace) -> dict:
    spec = find_spec("unime_ray")  # PYTHONPATH decides which code runs; not imported here
    code = Path(spec.origin).resolve().parents[1]
    data_dir = args.out / f"data-n{args.n}-seed{args.seed}"
    start = time.perf_counter()
    print(f"[scale] generating {args.n} pairs in {data_dir}", flush=True)
    data = generate(args.n, args.seed, data_dir)
    run = args.out / f"{args.label}-n{args.n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    progress = run / "progress.jsonl"
    log = (run / "job.log").open("w")
    cmd = [sys.executable, str(Path(__file__).resolve()), "job", "--run", str(run), "--data", str(data_dir)]
    cmd += ["--dim", str(args.dim), "--seed", str(args.seed), "--progress", str(progress)]
    cmd += ["--until", args.until, "--recall-queries", str(args.recall_queries), "--topics", str(args.topics)]
    cmd += [f"--set={kv}" for kv in args.set]
    # cwd = the code's own tree: Ray ships the driver's sys.path / cwd to its workers.
    proc = subprocess.Popen(cmd, cwd=code, stdout=log, stderr=subprocess.STDOUT)
    print(f"[scale] job pid {proc.pid}, code {code}, log {run / 'job.log'}", flush=True)
    record = {
        "label": args.label,
        "n": args.n,
        "dim": args.dim,
        "seed": args.seed,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": {"cores": os.cpu_count(), "ram_gb": _ram_gb()},
        "code": {"path": str(code), "commit": _git_commit(code)},
        "data": {"rows": args.n, "datasets": len(data["datasets"]), "bytes": data["bytes"]},
        "limits": {"max_rss_gb": args.max_rss_gb, "timeout_min": args.timeout_min},
        "settings": {"set": args.set, "until": args.until, "topics": args.topics},
        "stages": {},
        "status": "running",
    }
    peaks: dict[str, dict[str, float]] = {}
    seen, phase, job_start, phase_start = 0, "startup", time.time(), time.time()
    limit_s = args.timeout_min * 60 if args.timeout_min else float("inf")
    died = None
    while True:
        events = _read(str(progress)).splitlines() if progress.exists() else []
        for line in events[seen:]:
            e = json.loads(line)
            if e["event"] == "start":
                record["mode"], record["overrides"] = e["mode"], e["overrides"]
                print(f"[scale] mode: {e['mode']}", flush=True)
            elif e["event"] == "phase":
                phase, phase_start = e["phase"], e["t"]
            elif e["event"] == "done":
                figures = {k: v for k, v in e.items() if k not in ("event", "t", "phase")}
                p = peaks.get(e["phase"], {})
                figures["worker_peak_mb"] = round(p.get("worker", 0), 1)
                figures["ray_total_peak_mb"] = round(p.get("ray", 0), 1)
                figures["driver_peak_mb"] = max(figures["driver_peak_mb"], round(p.get("driver", 0), 1))
                if e["phase"].startswith("prep"):
                    figures["helper_peak_mb"] = round(p.get("helper", 0), 1)
                record["stages"][e["phase"]] = figures
                print(_line(e["phase"], figures), flush=True)
            elif e["event"] == "error":
                record["status"] = f"failed in {e['phase']}: {e['error']}"
        seen = len(events)
        if proc.poll() is not None:
            break
        now = sample(proc.pid)
        p = peaks.setdefault(phase, {})
        for key, value in now.items():
            p[key] = max(p.get(key, 0.0), value)
        elapsed = time.time() - job_start
        if now["total"] > args.max_rss_gb * 1024 or elapsed > limit_s:
            kill_tree(proc.pid)
            proc.wait()
            why = "rss" if now["total"] > args.max_rss_gb * 1024 else "timeout"
            died = {
                "stage": phase,
                "reason": why,
                "seconds_in_stage": round(time.time() - phase_start, 1),
                "seconds_total": round(elapsed, 1),
                "rss_gb": round(now["total"] / 1024, 2),
                "driver_rss_gb": round(now["driver"] / 1024, 2),
                "largest_worker_rss_gb": round(now["worker"] / 1024, 2),
                "stage_peak_driver_rss_gb": round(p["driver"] / 1024, 2),
                "stage_peak_total_rss_gb": round(p["total"] / 1024, 2),
                "progress": stage_progress(run, phase),
            }
            if why == "rss":
                record["status"] = f"killed: RSS {died['rss_gb']} GB > {args.max_rss_gb} GB in stage {phase}"
            else:
                record["status"] = (
                    f"did not finish: stage {phase} after {died['seconds_in_stage']:.0f} s "
                    f"({elapsed:.0f} s into the job)"
                )
            print(f"[scale] {record['status']} ({died})", flush=True)
            break
        time.sleep(TICK)
    log.close()
    if died:
        record["died"] = died
    elif record["status"] == "running":
        record["status"] = "finished" if proc.returncode == 0 else f"job exited with {proc.returncode}"
    record.setdefault("mode", "unknown (the job did not start)")
    pipeline = [s for s in ("ingest", "embed", "retrieve", "judge", "sample") if s in record["stages"]]
    record["total_seconds"] = round(sum(record["stages"][s]["seconds"] for s in pipeline), 1)
    record["judge_request_bytes_per_1m"] = record["stages"].get("judge", {}).get("request_bytes_per_1m")
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    record["run_dir"] = str(run)
    return record


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        p = argparse.ArgumentParser(prog="scale.py job")
        p.add_argument("cmd")
        for name in ("--run", "--data", "--progress"):
            p.add_argument(name, type=Path, required=True)
        p.add_argument("--dim", type=int, required=True)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--until", required=True)
        p.add_argument("--recall-queries", type=int, required=True)
        p.add_argument("--set", action="append", default=[])
        p.add_argument("--topics", type=int, required=True)
        a = p.parse_args()
        job(a.run, a.data, a.dim, a.seed, a.progress, a.set, a.until, a.recall_queries, a.topics)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000, help="MMEB-train pairs (662000 = the paper's size)")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension")
    p.add_argument(
        "--topics",
        type=int,
        default=0,
        help="concepts per topic in the planted embeddings (0: flat; 16 gives neighbourhoods of ~64 items, "
        "what an approximate index needs: bench/scale_data.py)",
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/unime-scale"), help="data and run folders")
    p.add_argument("--label", default="new", help="results key with --n (e.g. new, old)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-gb", type=float, default=20.0, help="kill the job above this summed RSS")
    p.add_argument("--timeout-min", type=float, default=0, help="kill the job after this long (0 = never)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the job, e.g. mining.index=ivf (repeatable)",
    )
    p.add_argument(
        "--until",
        default="read",
        choices=["ingest", "embed", "retrieve", "judge", "sample", "read"],
        help="the last phase to run: a stage, or the training read after sample (one epoch's micro-batches)",
    )
    p.add_argument(
        "--recall-queries",
        type=int,
        default=2000,
        help="with an approximate index: queries whose top_n is checked against exact search (0 = none)",
    )
    args = p.parse_args()
    args.out = args.out.resolve()
    record = harness(args)
    save(record, args.results)
    print("\n" + table(record) + "\n", flush=True)
    print(f"[scale] {record['status']}; pipeline {record['total_seconds']} s; results in {args.results}")
    if record["status"] != "finished":
        # Recorded either way; the exit code tells scripts and CI the run did not complete.
        print(f"[scale] the job's log: {record['run_dir']}/job.log", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
