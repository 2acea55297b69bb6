"""Judge throughput: vLLM vs transformers on the same CPU model, and vLLM with vs without prefix sharing.

    python bench/judge.py                      # small (~75M) Qwen2-VL, 16 queries x 16 candidates
    python bench/judge.py --queries 4 --size tiny   # quick check

Prompts are real judge prompts from the synthetic world, query-major like the mining job sends them
(each query's candidates together, so its instruction + query prefix is shared). Engine start-up and a
warm-up pass are excluded; each figure is the best of `--repeats` timed passes. Ratios are against the
transformers backend measured in the same run. Writes bench/results/judge.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from unime_ray.config import JudgeConfig, ModelConfig
from unime_ray.data.mmeb import read_folder
from unime_ray.data.synthetic import make_world
from unime_ray.models.judge import TransformersJudge, VLLMJudge
from unime_ray.models.tiny import make_tiny

OUT = Path(__file__).parent / "results"


def pairs(world: Path, n_queries: int, n_cands: int) -> list[tuple]:
    table = read_folder(world / "train", "pairs", image_root=world / "images").table.to_pylist()
    queries = table[:: max(1, len(table) // n_queries)][:n_queries]
    cands = [(r["pos_text"], r["pos_image"]) for r in table[1 :: max(1, len(table) // n_cands)][:n_cands]]
    return [(q["qry_text"], q["qry_image"], ct, ci) for q in queries for ct, ci in cands]


def timed(judge, work: list[tuple], repeats: int) -> float:
    judge.score(work[: min(len(work), 32)])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        judge.score(work)
        best = min(best, time.perf_counter() - start)
    return len(work) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    world, model = OUT / "world", OUT / f"judge-{a.size}"
    if not (world / "world.json").is_file():
        make_world(world)
    if not (model / "config.json").is_file():
        make_tiny(model, "qwen2-vl", size=a.size)
    work = pairs(world, a.queries, a.candidates)
    m = ModelConfig(path=str(model), dtype="float32", image_size=56, max_length=1024, batch_size=a.batch_size)

    def cfg(**kw) -> JudgeConfig:
        return JudgeConfig(model=m, vllm_model_impl="transformers", gpu_memory_utilization=0.3, **kw)

    rows = {"transformers": timed(TransformersJudge(m, world / "images"), work, a.repeats)}
    for name, kw in (
        ("vllm, prefix sharing", {"block_size": 32}),
        ("vllm, no prefix sharing", {"prefix_caching": False}),
    ):
        judge = VLLMJudge(cfg(backend="vllm", **kw), world / "images")
        rows[name] = timed(judge, work, a.repeats)
        del judge
    params = sum(x.numel() for x in TransformersJudge(m, world / "images").model.parameters())
    base = rows["transformers"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores {platform.machine()} {platform.processor()}".strip(),
        "model": f"Qwen2-VL {a.size}, {params / 1e6:.1f}M parameters, float32",
        "pairs": len(work),
        "pairs_per_s": {k: round(v, 1) for k, v in rows.items()},
        "ratio_vs_transformers": {k: round(v / base, 2) for k, v in rows.items()},
    }
    (OUT / "judge.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
