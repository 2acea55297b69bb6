"""What an IVF index keeps of exact top-50 search, and what it saves, per `nprobe`: recall@50 and search
time against exact search in the same process (`engine.index.PoolIndex`, as mining's retrieve uses it).

Two kinds of pool, 256-d unit vectors, queries drawn near pool items:

- `flat`: the shape of `bench/scale_data.py`'s planted vectors: concepts of ~4 items around random
  centres, so a query has ~3 close neighbours and ranks 4-50 are the upper tail of near-orthogonal noise;
- `topics`: the same with a level above, topics of ~64 items, so the top 50 is a neighbourhood, as in a
  trained embedding space (related captions, similar images).

With `--run` (a `bench/scale.py` run folder) the harness's own datasets are measured too: `--datasets`
(largest first by default), their embed stage's vectors, 2000 seeded queries each.

    python bench/ivf_recall.py --results bench/results/ivf_recall.json
    python bench/ivf_recall.py --run /tmp/unime-scale/new-n662000 --datasets MSCOCO DocVQA
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from unime_ray.engine.index import PoolIndex
from unime_ray.mining.retrieve import _matrix, dataset_embeddings

K = 50
QUERIES = 2000


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def planted(kind: str, n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A pool of `n` vectors of the given kind and QUERIES queries, each a pool item plus noise."""
    rng = np.random.default_rng(seed)
    concept = unit(rng.normal(size=(n // 4, dim)))[rng.integers(0, n // 4, n)]
    noise = 0.5 * unit(rng.normal(size=(n, dim)))
    if kind == "flat":
        pool = unit(concept + noise)
    else:
        topic = unit(rng.normal(size=(n // 64, dim)))[rng.integers(0, n // 64, n)]
        pool = unit(topic + 0.7 * concept + noise)
    picked = pool[rng.choice(n, QUERIES, replace=False)]
    return pool, unit(picked + 0.3 * unit(rng.normal(size=(QUERIES, dim))))


def harness_vectors(run: Path, dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's pool and QUERIES of its queries, from a scale run's embed stage."""
    query_rows, pool_rows = dataset_embeddings(str(run / "mining" / "embed" / "results"), dataset)
    pool, queries = _matrix(pool_rows, dataset, None), _matrix(query_rows, dataset, None)
    pick = np.random.default_rng(seed).choice(len(queries), min(QUERIES, len(queries)), replace=False)
    return pool, queries[pick]


def measure(pool: np.ndarray, queries: np.ndarray, nprobes: list[int]) -> dict:
    """Exact search, then IVF at each nprobe: seconds, time / exact, recall@K of the exact top K."""
    start = time.perf_counter()
    exact_scores, exact = PoolIndex(pool).search(queries, K)
    exact_s = time.perf_counter() - start
    out = {
        "pool": len(pool),
        "exact_search_s": round(exact_s, 3),
        "median_sim_at_rank": {r: round(float(np.median(exact_scores[:, r - 1])), 3) for r in (3, 10, 50)},
        "ivf": [],
    }
    for nprobe in nprobes:
        start = time.perf_counter()
        index = PoolIndex(pool, index="ivf", nprobe=nprobe)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        _, found = index.search(queries, K)
        search_s = time.perf_counter() - start
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, found, strict=True)])
        out["ivf"].append(
            {
                "nprobe": nprobe,
                "nlist": index.ivf.nlist,
                "build_s": round(build_s, 3),
                "search_s": round(search_s, 3),
                "search_vs_exact": round(search_s / exact_s, 3),
                "recall_at_50": round(float(recall), 4),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=47547, help="planted pool size (MSCOCO's at 662k)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--run", type=Path, help="a bench/scale.py run folder: measure its datasets too")
    p.add_argument("--datasets", nargs="+", default=["MSCOCO", "DocVQA"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path)
    args = p.parse_args()
    figures = {}
    for kind in ("flat", "topics"):
        figures[f"planted {kind}"] = measure(*planted(kind, args.pool, args.dim, args.seed), args.nprobe)
    for name in args.datasets if args.run else []:
        figures[f"scale run {name}"] = measure(*harness_vectors(args.run, name, args.seed), args.nprobe)
    for name, f in figures.items():
        print(f"{name}: pool {f['pool']}, exact {f['exact_search_s']} s, sim at rank 3/10/50 "
              f"{list(f['median_sim_at_rank'].values())}")  # fmt: skip
        for row in f["ivf"]:
            print(f"  nprobe {row['nprobe']:4d} of {row['nlist']}: {row['search_vs_exact']:.2f}x exact's "
                  f"search time, recall@50 {row['recall_at_50']:.3f}")  # fmt: skip
    if args.results:
        args.results.write_text(
            json.dumps(
                {
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    **figures,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
