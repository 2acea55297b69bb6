"""Serving load benchmark: N concurrent HTTP clients on 127.0.0.1 against the Ray Serve app, for a bounded
time, with the embedder's request batching off and then on, in the same run.

    python bench/serve_load.py [--clients 32 --seconds 20 --sizes tiny small --batch-wait 0.25]

Builds (once, under bench/results/serve/) the synthetic world, a random-weight Qwen2-VL of each size
and the index of the world's captions corpus (images + captions), then serves it on a local Ray
bound to 127.0.0.1. Each client sends POST /v1/search (a caption with MMEB's text-to-image
instruction, top_k 10, no rerank) back to back; a request counts as an error unless it returns 200.
Reports per mode QPS, p50 / p99 latency, errors, the embedder's mean batch size, and the CPU time per
request of each Serve process (proxy, Ingress, Embedder, Index) and of the client, which shows what
bounds the throughput; prints a table and writes bench/results/serve_load.json. "Batching off" is the
same app with the embedder's `@serve.batch` held to batches of one, so the comparison isolates
batching. `--sizes tiny small` (default both): the ~0.2M-parameter model, whose forward pass is cheap
next to Serve's own per-request work, and the ~75M one, whose forward pass dominates.
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
ROLES = ("ProxyActor", "Ingress", "Embedder", "Index")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(size: str) -> tuple[Config, list[str]]:
    """The config of the benchmark app (world, model and index built when missing) and the captions."""
    work = ROOT / "serve"
    world, model = work / "world", work / f"qwen2-vl-{size}"
    if not (world / "world.json").is_file():
        make_world(world, seed=0)
    if not (model / "config.json").is_file():
        make_tiny(model, "qwen2-vl", size=size)
    cfg = Config()
    cfg.run.output_dir = str(work / f"run-{size}")
    cfg.data.image_root = str(world / "images")
    cfg.embedder = ModelConfig(path=str(model), image_size=56, max_length=256, batch_size=16)
    corpus = world / "retrieval" / "captions.jsonl"
    if not (index_dir(cfg) / "meta.json").is_file():
        build_index(cfg, corpus)
    captions = [c for line in corpus.read_text().splitlines() for c in json.loads(line)["captions"]]
    return cfg, captions


async def load(url: str, captions: list[str], clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients for `seconds`: QPS, latency percentiles, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    rng = random.Random(0)

    async def client(http: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            body = {"query": {"text": rng.choice(captions), "instruction": INSTRUCTION}, "top_k": 10}
            start = time.perf_counter()
            try:
                response = await http.post(url, json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(repr(error))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": elapsed,
        "qps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
    }


def serve_processes() -> dict[str, psutil.Process]:
    """This run's Serve proxy and replicas by role (children of the local Ray this driver started)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for role in ROLES:
            if title.startswith(f"ray::ServeReplica:bench:{role}") or title.startswith(f"ray::{role}"):
                found[role] = proc
    return found


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {role: sum(proc.cpu_times()[:2]) for role, proc in procs.items()}


def measure(url: str, captions: list[str], clients: int, seconds: float) -> dict:
    """One measured window: load figures, the embedder's mean batch, CPU ms per request by process."""
    stats = serve.get_deployment_handle("Embedder", app_name="bench").stats
    procs = {**serve_processes(), "client": psutil.Process()}
    before, cpu_before = stats.remote().result(), cpu_seconds(procs)
    result = asyncio.run(load(url, captions, clients, seconds))
    after, cpu_after = stats.remote().result(), cpu_seconds(procs)
    result["mean_batch"] = (after["inputs"] - before["inputs"]) / max(after["batches"] - before["batches"], 1)
    n = max(result["requests"], 1)
    result["cpu_ms_per_request"] = {r: 1000 * (cpu_after[r] - cpu_before[r]) / n for r in procs}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load time per mode")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before each measurement")
    parser.add_argument(
        "--sizes", nargs="+", choices=["tiny", "small"], default=["tiny", "small"], help="model sizes"
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="embedder batch size at most (on)")
    parser.add_argument(
        "--batch-wait", type=float, default=0.25, help="serve.batch_wait_s: the adaptive wait's cap (on)"
    )
    args = parser.parse_args()

    init_ray(num_cpus=os.cpu_count())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/search"
    results: dict[str, dict] = {}
    try:
        for size in args.sizes:
            cfg, captions = prepare(size)
            cfg.serve.max_batch_size, cfg.serve.batch_wait_s = args.max_batch_size, args.batch_wait
            for batching in (False, True):
                cfg.serve.batching = batching
                serve.run(build_app(cfg), name="bench", route_prefix="/")
                asyncio.run(load(url, captions, args.clients, args.warmup))
                mode = "on" if batching else "off"
                results[f"{size}, batching {mode}"] = measure(url, captions, args.clients, args.seconds)
                serve.delete("bench")
    finally:
        serve.shutdown()

    summary = {}
    for size in args.sizes:
        off, on = results[f"{size}, batching off"], results[f"{size}, batching on"]
        summary[size] = {
            "qps_ratio_on_vs_off": on["qps"] / off["qps"],
            "p99_ratio_on_vs_off": on["p99_ms"] / off["p99_ms"],
            "zero_errors": off["errors"] == on["errors"] == 0,
        }
    machine = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"{args.clients} clients x {args.seconds:.0f} s per mode; {date}")
    loadavg = ", ".join(f"{x:.1f}" for x in machine["load_average_after"])
    print(f"{machine['cpu_count']} cores, {machine['cpu_model']}; load average after: {loadavg}")
    header = f"{'requests':>8} {'QPS':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'batch':>6}"
    print(f"{'model, mode':<22} {header}  CPU ms/request")
    for name, r in results.items():
        cpu = " ".join(f"{role} {ms:.1f}" for role, ms in r["cpu_ms_per_request"].items())
        row = f"{r['requests']:>8} {r['qps']:>7.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>6}"
        print(f"{name:<22} {row} {r['mean_batch']:>6.1f}  {cpu}")
    for size, ratios in summary.items():
        print(
            f"{size}: batching on / off {ratios['qps_ratio_on_vs_off']:.2f}x QPS, "
            f"{ratios['p99_ratio_on_vs_off']:.2f}x p99 latency"
        )
    out = ROOT / "serve_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "date": date, "machine": machine, "results": results, "summary": summary}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
