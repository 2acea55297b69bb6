"""Retrieve-stage benchmark: FAISS exact top-k (our `search_topk`) vs a torch `matmul + topk` baseline.

    python bench/retrieval.py [--n 100000 --d 128 --nq 2000 --k 50]

Random unit vectors; each method gets a warm-up run, then the best of 3 timed runs (perf_counter).
Checks that every method returns the baseline's top-k sets (mean overlap fraction), prints a table
and writes bench/results/retrieval.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from unime_ray.engine.index import search_topk

RESULTS = Path(__file__).parent / "results" / "retrieval.json"


def cpu_model() -> str:
    """platform.processor() is often empty on Linux; fall back to /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def torch_topk(queries: np.ndarray, pool: np.ndarray, k: int, block: int = 512) -> np.ndarray:
    q, p = torch.from_numpy(queries), torch.from_numpy(pool)
    return torch.cat(
        [torch.topk(q[i : i + block] @ p.T, k, dim=1).indices for i in range(0, len(q), block)]
    ).numpy()


def best_of(fn: Callable[[], np.ndarray], repeats: int = 3) -> tuple[float, np.ndarray]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def overlap(idx: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx, ref, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="pool size")
    parser.add_argument("--d", type=int, default=128, help="dimension")
    parser.add_argument("--nq", type=int, default=2000, help="queries")
    parser.add_argument("--k", type=int, default=50, help="neighbours per query")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((args.n, args.d), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = rng.standard_normal((args.nq, args.d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    chunk = max(1, args.n // 4)
    methods: dict[str, Callable[[], np.ndarray]] = {
        "torch matmul+topk (baseline)": lambda: torch_topk(queries, pool, args.k),
        "faiss exact (search_topk)": lambda: search_topk(queries, pool, args.k)[1],
        f"faiss exact, 4 chunks of {chunk}": lambda: search_topk(queries, pool, args.k, chunk_size=chunk)[1],
    }
    rows = []
    baseline_s, baseline_idx = None, None
    for name, fn in methods.items():
        seconds, idx = best_of(fn)
        if baseline_idx is None:
            baseline_s, baseline_idx = seconds, idx
        rows.append(
            dict(
                method=name,
                seconds=seconds,
                queries_per_s=args.nq / seconds,
                speedup_vs_baseline=baseline_s / seconds,
                overlap_with_baseline=overlap(idx, baseline_idx),
            )
        )

    machine = dict(
        cpu_count=os.cpu_count(),
        processor=platform.processor(),
        cpu_model=cpu_model(),
        faiss=faiss.__version__,
        faiss_threads=faiss.omp_get_max_threads(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"pool {args.n} x {args.d}, {args.nq} queries, top-{args.k}; {date}")
    print(f"{machine['cpu_count']} cores, {machine['cpu_model']} ({machine['processor'] or 'processor n/a'})")
    print(f"faiss {machine['faiss']} ({machine['faiss_threads']} threads), torch {machine['torch']}")
    print(f"{'method':<34} {'seconds':>8} {'queries/s':>10} {'vs baseline':>11} {'overlap':>8}")
    for r in rows:
        print(
            f"{r['method']:<34} {r['seconds']:>8.3f} {r['queries_per_s']:>10.0f} "
            f"{r['speedup_vs_baseline']:>10.2f}x {r['overlap_with_baseline']:>8.4f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(dict(args=vars(args), date=date, machine=machine, results=rows), indent=2) + "\n"
    )
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
