"""Serving load benchmark: HTTP clients on 127.0.0.1 against the Ray Serve app, one scenario per run.

    python bench/serve_load.py [batching] [--clients 32 --seconds 20 --sizes tiny small --batch-wait 0.25]
    python bench/serve_load.py faults    [--seconds 60 --health-check-s 2]
    python bench/serve_load.py overload  [--seconds 20 --max-ongoing 32 --max-queued 8 --sizes small]
    python bench/serve_load.py soak      [--seconds 600 --clients 8 --sample-s 30]
    python bench/serve_load.py batching --gpu [--model DIR]        # on a GPU machine, see below

Builds (once, under bench/results/serve/) the synthetic world, a random-weight Qwen2-VL of each size
and the index of the world's captions corpus (images + captions), then serves it on a local Ray
bound to 127.0.0.1. Clients send POST /v1/search (a caption with MMEB's text-to-image instruction,
top_k 10, no rerank); a request is an error unless it returns 200, or 503 where shedding is the point.

batching: closed-loop clients for a bounded time with the embedder's request batching off, then on,
  in the same run: QPS, p50 / p99 latency, errors, the embedder's mean batch size, and the CPU time
  per request of each Serve process (proxy, Ingress, Embedder, Index) and of the client, which shows
  what bounds the throughput. "Off" is the same app with `@serve.batch` held to batches of one, so the
  comparison isolates batching. `--sizes tiny small` (default both): the ~0.2M-parameter model, whose
  forward pass is cheap next to Serve's own per-request work, and the ~75M one, whose forward pass
  dominates. Writes bench/results/serve_load.json.
faults: 32 closed-loop clients; `--seconds` in, at 25% an Embedder replica is killed (`ray.kill`), at
  60% the Index replica. Per kill: the QPS over the 5 s before, the time until 3 s in a row run at 85%
  of it or more, the slowest request meanwhile; the QPS of every second; errors (zero expected: the
  Ingress sends a call whose replica died once more, Serve re-routes the rest) and the calls the
  Ingress retried. A killed replica is replaced by Serve once its health check fails:
  `--health-check-s` (serve.<deployment>.health_check_period_s) bounds that wait. Writes
  bench/results/serve_faults.json.
overload: the Ingress runs `--max-ongoing` requests at once and Serve queues `--max-queued` more at the
  proxy (serve.ingress.max_ongoing_requests / max_queued_requests); beyond that Serve answers 503 with
  Retry-After. The model is the small one by default: its forward pass bounds the throughput, as a
  model on a GPU does behind a proxy with cores to spare (with the tiny one, on 2 cores, the HTTP path
  itself is the bottleneck, and refusing a request costs about what serving it does). First the
  sustainable load: `--clients` closed-loop clients after `--warmup` s, no shedding, their QPS R and
  p99. Then open-loop (Poisson arrivals, new users who do not wait for each other) at 2R and 4R for
  `--seconds` each: shed rate, accepted QPS, accepted p50 / p99, the 503s' p99, Retry-After present.
  Writes bench/results/serve_overload.json.
soak: `--clients` closed-loop clients (moderate load) for `--seconds` after a 30 s warm-up; the RSS of
  every Serve process (controller, proxy, each replica) is sampled every `--sample-s` seconds. Reports
  errors and each process's RSS growth from the first sample to the last, plots the samples to
  bench/results/soak.png, writes bench/results/serve_soak.json.

--gpu: the Embedder replicas get a GPU each (serve.embedder.num_gpus=1) and the defaults become 64
clients and batches of up to 32; with `--model DIR` (a local Qwen2-VL-style checkpoint, e.g. 2B) the
index is built with and served by that model instead of the random tiny one. The batching scenario then
shows the gain batching was built for: the aim is at least 3x the QPS at an equal or better p99. On this
project's 2 CPU cores the gain is capped (1.65x to 2.31x measured, CPU-bound; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import ray
import torch
from ray import serve

from unime_ray.config import Config, ModelConfig
from unime_ray.data.synthetic import make_world
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import init_ray
from unime_ray.serve.app import build_app
from unime_ray.serve.index import build_index, index_dir

ROOT = Path(__file__).parent / "results"
INSTRUCTION = "Find me an everyday image that matches the given caption:"
APP = "bench"
ROLES = ("ServeController", "ProxyActor", "Ingress", "Embedder", "Index")
# (start, end, status, Retry-After header) per request; status 0 = no HTTP answer
Record = tuple[float, float, int, str | None]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(size: str, model_dir: str = "") -> tuple[Config, list[str]]:
    """The config of the benchmark app (world, model and index built when missing) and the captions."""
    work = ROOT / "serve"
    world = work / "world"
    if not (world / "world.json").is_file():
        make_world(world, seed=0)
    if model_dir:
        model, run = Path(model_dir), work / f"run-{Path(model_dir).name}"
    else:
        model, run = work / f"qwen2-vl-{size}", work / f"run-{size}"
        if not (model / "config.json").is_file():
            make_tiny(model, "qwen2-vl", size=size)
    cfg = Config()
    cfg.run.output_dir = str(run)
    cfg.data.image_root = str(world / "images")
    cfg.embedder = ModelConfig(path=str(model), image_size=56, max_length=256, batch_size=16)
    corpus = world / "retrieval" / "captions.jsonl"
    if not (index_dir(cfg) / "meta.json").is_file():
        build_index(cfg, corpus)
    captions = [c for line in corpus.read_text().splitlines() for c in json.loads(line)["captions"]]
    return cfg, captions


def search_body(rng: random.Random, captions: list[str]) -> dict:
    return {"query": {"text": rng.choice(captions), "instruction": INSTRUCTION}, "top_k": 10}


async def post(
    http: httpx.AsyncClient, url: str, body: dict, records: list[Record], errors: list[str]
) -> None:
    start = time.perf_counter()
    try:
        response = await http.post(url, json=body)
        status, retry = response.status_code, response.headers.get("retry-after")
        if status not in (200, 503):
            errors.append(f"{status}: {response.text[:200]}")
    except httpx.HTTPError as error:
        status, retry = 0, None
        errors.append(repr(error))
    records.append((start, time.perf_counter(), status, retry))


async def closed_loop(
    url: str, captions: list[str], clients: int, seconds: float, stop: threading.Event | None = None
) -> tuple[list[Record], list[str]]:
    """`clients` clients, each sending its next request when its last one is answered, for `seconds`."""
    records: list[Record] = []
    errors: list[str] = []
    rng = random.Random(0)
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline and not (stop and stop.is_set()):
            await post(http, url, search_body(rng, captions), records, errors)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return records, errors


async def open_loop(
    url: str, captions: list[str], rate: float, seconds: float
) -> tuple[list[Record], list[str]]:
    """Requests arriving at `rate` per second (Poisson, seeded) for `seconds`, whatever the answers."""
    records: list[Record] = []
    errors: list[str] = []
    rng = random.Random(1)
    tasks = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None), timeout=120) as http:
        start = time.perf_counter()
        arrival = start
        while arrival < start + seconds:
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(post(http, url, search_body(rng, captions), records, errors)))
            arrival += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return records, errors


def summary(records: list[Record], errors: list[str], seconds: float) -> dict:
    ok = np.array([end - start for start, end, status, _ in records if status == 200]) * 1000
    shed = np.array([end - start for start, end, status, _ in records if status == 503]) * 1000

    def pct(values: np.ndarray, q: float) -> float | None:
        return float(np.percentile(values, q)) if len(values) else None

    return {
        "requests": len(ok),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": seconds,
        "qps": len(ok) / seconds,
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
        "shed": len(shed),
        "shed_rate": len(shed) / max(len(records), 1),
        "shed_p99_ms": pct(shed, 99),
        "retry_after": sorted({r for *_, status, r in records if status == 503}, key=str),
    }


def load(url: str, captions: list[str], clients: int, seconds: float, warmup: float = 0.0) -> dict:
    """`clients` closed-loop clients for `warmup` + `seconds`: QPS, latency percentiles, errors of the
    requests sent after the warm-up (one load, so the measured window does not open with a burst of
    `clients` requests at once)."""
    start = time.perf_counter()
    records, errors = asyncio.run(closed_loop(url, captions, clients, warmup + seconds))
    measured = [r for r in records if r[0] >= start + warmup]
    return summary(measured, errors, time.perf_counter() - start - warmup)


def serve_processes() -> dict[str, psutil.Process]:
    """This run's Serve controller, proxy and replicas by role (children of the local Ray this driver
    started); several replicas of a role are `role`, `role 2`, ..."""
    found: dict[str, psutil.Process] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for role in ROLES:
            if title.startswith(f"ray::ServeReplica:{APP}:{role}") or title.startswith(f"ray::{role}"):
                name, n = role, 1
                while name in found:
                    n += 1
                    name = f"{role} {n}"
                found[name] = proc
    return found


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {role: sum(proc.cpu_times()[:2]) for role, proc in procs.items()}


def measure(url: str, captions: list[str], clients: int, seconds: float) -> dict:
    """One measured window: load figures, the embedder's mean batch, CPU ms per request by process."""
    stats = serve.get_deployment_handle("Embedder", app_name=APP).stats
    procs = {r: p for r, p in serve_processes().items() if r != "ServeController"}
    procs["client"] = psutil.Process()
    before, cpu_before = stats.remote().result(), cpu_seconds(procs)
    result = load(url, captions, clients, seconds)
    after, cpu_after = stats.remote().result(), cpu_seconds(procs)
    result["mean_batch"] = (after["inputs"] - before["inputs"]) / max(after["batches"] - before["batches"], 1)
    n = max(result["requests"], 1)
    result["cpu_ms_per_request"] = {r: 1000 * (cpu_after[r] - cpu_before[r]) / n for r in procs}
    return result


def ingress_stats() -> dict:
    return serve.get_deployment_handle("Ingress", app_name=APP).stats.remote().result()


def kill_replica(deployment: str) -> str:
    """ray.kill one replica of `deployment` (Serve names its replica actors in namespace "serve")."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )
    ray.kill(ray.get_actor(names[0], namespace="serve"))
    return names[0]


def bench_batching(args: argparse.Namespace, url: str) -> dict:
    results: dict[str, dict] = {}
    for size in args.sizes:
        cfg, captions = prepare(size, args.model)
        configure(cfg, args)
        for batching in (False, True):
            cfg.serve.batching = batching
            serve.run(build_app(cfg), name=APP, route_prefix="/")
            load(url, captions, args.clients, args.warmup)
            mode = "on" if batching else "off"
            results[f"{size}, batching {mode}"] = measure(url, captions, args.clients, args.seconds)
            serve.delete(APP)
    summary_ = {}
    for size in args.sizes:
        off, on = results[f"{size}, batching off"], results[f"{size}, batching on"]
        summary_[size] = {
            "qps_ratio_on_vs_off": on["qps"] / off["qps"],
            "p99_ratio_on_vs_off": on["p99_ms"] / off["p99_ms"],
            "zero_errors": off["errors"] == on["errors"] == 0,
        }
    header = f"{'requests':>8} {'QPS':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'batch':>6}"
    print(f"{'model, mode':<22} {header}  CPU ms/request")
    for name, r in results.items():
        cpu = " ".join(f"{role} {ms:.1f}" for role, ms in r["cpu_ms_per_request"].items())
        row = f"{r['requests']:>8} {r['qps']:>7.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>6}"
        print(f"{name:<22} {row} {r['mean_batch']:>6.1f}  {cpu}")
    for size, ratios in summary_.items():
        print(
            f"{size}: batching on / off {ratios['qps_ratio_on_vs_off']:.2f}x QPS, "
            f"{ratios['p99_ratio_on_vs_off']:.2f}x p99 latency"
        )
    return {"results": results, "summary": summary_}


def qps_between(records: list[Record], start: float, end: float) -> float:
    return sum(1 for _, t, status, _ in records if status == 200 and start <= t < end) / (end - start)


def bench_faults(args: argparse.Namespace, url: str) -> dict:
    """Kill an Embedder replica, then the Index replica, under closed-loop load."""
    cfg, captions = prepare(args.sizes[0], args.model)
    configure(cfg, args)
    for d in (cfg.serve.embedder, cfg.serve.index):
        d.health_check_period_s = args.health_check_s
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    load(url, captions, args.clients, args.warmup)
    retried = ingress_stats()
    out: dict = {}
    stop = threading.Event()

    def run() -> None:
        out["records"], out["errors"] = asyncio.run(
            closed_loop(url, captions, args.clients, args.seconds, stop)
        )

    thread = threading.Thread(target=run)
    start = time.perf_counter()
    thread.start()
    kills = {}
    for deployment, at in (("Embedder", 0.25), ("Index", 0.6)):
        time.sleep(max(0.0, start + at * args.seconds - time.perf_counter()))
        kills[deployment] = (time.perf_counter(), kill_replica(deployment))
    thread.join()
    records, errors = out["records"], out["errors"]
    end = max(t for _, t, *_ in records)
    stats = ingress_stats()
    result = summary(records, errors, end - start)
    result["retried"] = {k: stats[k] - retried.get(k, 0) for k in stats if k.startswith("retried_")}
    result["kills"] = {}
    for deployment, (at, replica) in kills.items():
        full = qps_between(records, at - 5, at)
        # back: the first moment from which 3 s run at 85% of the QPS before the kill or more
        back = next(
            (t - at for t in np.arange(at, end - 3, 0.1) if qps_between(records, t, t + 3) >= 0.85 * full),
            None,
        )
        window = at + (back if back is not None else end - at) + 3
        slowest = max((t - s for s, t, status, _ in records if status == 200 and at <= t < window), default=0)
        result["kills"][deployment] = {
            "replica": replica,
            "at_s": at - start,
            "qps_before": full,
            "seconds_to_85pct_qps": back,
            "slowest_request_ms": 1000 * slowest,
        }
        recovered = "never" if back is None else f"{back:.1f} s"
        print(
            f"{deployment} replica killed at {at - start:.1f} s: QPS before {full:.1f}, back to 85% after "
            f"{recovered}, slowest request meanwhile {1000 * slowest:.0f} ms"
        )
    timeline = np.histogram(
        [t - start for _, t, status, _ in records if status == 200], bins=np.arange(0, end - start + 1, 1.0)
    )[0]
    result["qps_per_second"] = timeline.tolist()
    print(
        f"{result['requests']} requests, {result['errors']} errors, calls retried by the Ingress "
        f"{result['retried']}; QPS per second: {' '.join(str(x) for x in timeline)}"
    )
    return result


def bench_overload(args: argparse.Namespace, url: str) -> dict:
    cfg, captions = prepare(args.sizes[0], args.model)
    configure(cfg, args)
    ingress = cfg.serve.ingress
    ingress.max_ongoing_requests, ingress.max_queued_requests = args.max_ongoing, args.max_queued
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    sustainable = load(url, captions, args.clients, args.seconds, args.warmup)
    rate = sustainable["qps"]
    rows = {"sustainable (closed loop)": sustainable}
    print(
        f"sustainable: {args.clients} clients, {rate:.1f} QPS, p50 {sustainable['p50_ms']:.0f} ms, "
        f"p99 {sustainable['p99_ms']:.0f} ms, {sustainable['shed']} shed, {sustainable['errors']} errors"
    )
    for factor in (2, 4):
        start = time.perf_counter()
        records, errors = asyncio.run(open_loop(url, captions, factor * rate, args.seconds))
        row = summary(records, errors, time.perf_counter() - start)
        row["offered_qps"] = len(records) / args.seconds
        rows[f"{factor}x"] = row
        p99 = row["p99_ms"] or 0
        print(
            f"{factor}x ({row['offered_qps']:.0f}/s offered): {row['shed_rate']:.0%} shed (503 p99 "
            f"{row['shed_p99_ms'] or 0:.0f} ms, Retry-After {row['retry_after']}), accepted "
            f"{row['qps']:.1f} QPS, p50 {row['p50_ms'] or 0:.0f} ms, p99 {p99:.0f} ms "
            f"({p99 / sustainable['p99_ms']:.2f}x the sustainable p99), {row['errors']} errors"
        )
    return {"results": rows}


def bench_soak(args: argparse.Namespace, url: str) -> dict:
    cfg, captions = prepare(args.sizes[0], args.model)
    configure(cfg, args)
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    load(url, captions, args.clients, 30)
    procs = serve_processes()
    out: dict = {}

    def run() -> None:
        out["records"], out["errors"] = asyncio.run(closed_loop(url, captions, args.clients, args.seconds))

    thread = threading.Thread(target=run)
    samples: dict[str, list[float]] = {role: [] for role in procs}
    times: list[float] = []
    start = time.perf_counter()
    thread.start()
    while True:
        times.append(time.perf_counter() - start)
        for role, proc in procs.items():
            samples[role].append(proc.memory_info().rss / 2**20)
        print(
            f"{times[-1]:5.0f} s  " + "  ".join(f"{r} {mb[-1]:.0f} MB" for r, mb in samples.items()),
            flush=True,
        )
        if not thread.is_alive() or times[-1] >= args.seconds:
            break
        time.sleep(max(0.0, start + len(times) * args.sample_s - time.perf_counter()))
    thread.join()
    result = summary(out["records"], out["errors"], args.seconds)
    result["rss_mb"] = {"t_s": times, **samples}
    result["rss_growth"] = {role: mb[-1] / mb[0] - 1 for role, mb in samples.items()}
    print(
        f"{result['requests']} requests ({result['qps']:.1f} QPS, p99 {result['p99_ms']:.0f} ms), "
        f"{result['errors']} errors; RSS growth: "
        + ", ".join(f"{r} {g:+.1%}" for r, g in result["rss_growth"].items())
    )
    plot_soak(times, samples, result, ROOT / "soak.png")
    return result


def plot_soak(times: list[float], samples: dict[str, list[float]], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for role, mb in samples.items():
        ax.plot(
            np.array(times) / 60,
            mb,
            marker="o",
            markersize=3,
            label=f"{role} ({result['rss_growth'][role]:+.1%})",
        )
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"Soak: {result['requests']} requests at {result['qps']:.0f} QPS, {result['errors']} errors "
        f"({datetime.date.today()})"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"written {path}")


def configure(cfg: Config, args: argparse.Namespace) -> None:
    cfg.serve.max_batch_size, cfg.serve.batch_wait_s = args.max_batch_size, args.batch_wait
    if args.gpu:
        cfg.serve.embedder.num_gpus = 1
        cfg.index.gpus_per_actor = 1


SCENARIOS = {
    "batching": bench_batching,
    "faults": bench_faults,
    "overload": bench_overload,
    "soak": bench_soak,
}
# overload: the small model, whose forward pass (not the HTTP path) bounds the throughput, as on a GPU
DEFAULT_SIZES = {"batching": ["tiny", "small"], "overload": ["small"]}
DEFAULTS = {  # per scenario: --clients, --seconds
    "batching": (32, 20.0),
    "faults": (32, 60.0),
    "overload": (32, 20.0),
    "soak": (8, 600.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS), default="batching")
    parser.add_argument("--clients", type=int, help="closed-loop clients (default: 32; soak 8; --gpu 64)")
    parser.add_argument("--seconds", type=float, help="measured load time (default: 20; faults 60; soak 600)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before measuring")
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=["tiny", "small"],
        help="model sizes (batching: both, overload: small, else tiny)",
    )
    parser.add_argument("--model", default="", help="a local model folder to serve instead of a tiny one")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Embedder replica, GPU defaults")
    parser.add_argument("--max-batch-size", type=int, help="embedder batch size at most (16; --gpu 32)")
    parser.add_argument(
        "--batch-wait", type=float, default=0.25, help="serve.batch_wait_s: the adaptive wait's cap"
    )
    parser.add_argument(
        "--health-check-s", type=float, default=2.0, help="faults: replica health check period"
    )
    parser.add_argument("--max-ongoing", type=int, default=32, help="overload: Ingress requests at once")
    parser.add_argument("--max-queued", type=int, default=8, help="overload: requests queued at the proxy")
    parser.add_argument("--sample-s", type=float, default=30.0, help="soak: seconds between RSS samples")
    args = parser.parse_args()
    clients, seconds = DEFAULTS[args.scenario]
    args.clients = args.clients or (64 if args.gpu and args.scenario == "batching" else clients)
    args.seconds = args.seconds or seconds
    args.max_batch_size = args.max_batch_size or (32 if args.gpu else 16)
    if not args.sizes:  # one name only with --model, whose folder replaces the tiny models
        args.sizes = ["tiny"] if args.model else DEFAULT_SIZES.get(args.scenario, ["tiny"])

    init_ray(num_cpus=os.cpu_count())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/search"
    date = datetime.datetime.now().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    try:
        report = SCENARIOS[args.scenario](args, url)
    finally:
        serve.shutdown()
    machine = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    loadavg = ", ".join(f"{x:.1f}" for x in machine["load_average_after"])
    print(f"{args.scenario}: {args.clients} clients, {args.seconds:.0f} s; {date}")
    print(f"{machine['cpu_count']} cores, {machine['cpu_model']}; load average after: {loadavg}")
    name = "serve_load.json" if args.scenario == "batching" else f"serve_{args.scenario}.json"
    out = ROOT / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args), "date": date, "machine": machine, **report}, indent=2) + "\n"
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
