"""The reranker's loss: logits at the answer positions only (`answer_losses`, `logits_to_keep`, since
739ce0e) against the full vocabulary's logits at every position (the code before it), forward +
backward of one training batch of the real reranker task, per model: seconds per step and the
process's peak RSS.

    python bench/rerank_loss.py                  # mid Qwen2-VL and SmolLM2 LLaVA-OV, 4 mined rows, 5 steps
    python bench/rerank_loss.py --models mid --steps 3

Mines the synthetic world once with the oracle judge (as the learning test does), takes the first
`--rows` mined rows, and builds their 3 sequences each (Yes, No, listwise) through `RerankTask.batch`.
Each (model, loss) runs in a fresh process, so its peak RSS is its own; the two losses alternate per
model. Ratios are the old loss against the new, in the same run. Writes bench/results/rerank_loss.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config
from unime_ray.demo import mine_with_oracle
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import init_ray
from unime_ray.train.rerank import RerankTask, answer_losses

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "jobs/configs/tiny.yaml"
OUT = ROOT / "bench" / "results"
WORK = OUT / "rerank_loss"
MODELS = {  # name -> (builder arguments, overrides)
    "mid": (("qwen2-vl", "mid", {}), ["reranker.lora.enabled=false", "reranker.model.image_size=56"]),
    "smol": (
        ("llava-ov", "mid", {"text_model": "smollm2"}),
        ["reranker.lora.rank=16", "reranker.lora.alpha=32", "reranker.model.image_size=28"],
    ),
}


def full_logits_losses(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The loss before 739ce0e: every position's logits over the whole vocabulary, shifted, masked."""
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = target != -100
    return (per_token * mask).sum(1) / mask.sum(1)


def measure(overrides: list[str], rows: list[dict], loss: str, steps: int, queue) -> None:
    """In a fresh process: one warm-up and `steps` timed forward + backward passes of `loss`."""
    torch.set_num_threads(os.cpu_count() or 1)
    task = RerankTask(load_config(CONFIG, overrides))
    inputs, labels, _ = task.batch(rows)
    losses, seconds = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        if loss == "answer positions":
            per_example = answer_losses(task.model, inputs, labels).mean
        else:
            per_example = full_logits_losses(task.model, inputs, labels)
        per_example.sum().backward()
        task.model.zero_grad(set_to_none=True)
        if step:
            seconds.append(time.perf_counter() - start)
        losses = per_example.detach().tolist()
    queue.put(
        {
            "s_per_step": statistics.median(seconds),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "sequences": int(labels.shape[0]),
            "tokens": int(labels.shape[1]),
            "losses": losses,
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--rows", type=int, default=4, help="mined rows per batch (3 sequences each)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    args = p.parse_args()

    if not (WORK / "mining/sample/hard_negatives.parquet").is_file():
        init_ray(num_cpus=2)
        mine_with_oracle(CONFIG, WORK)
    data = WORK / "mining/sample/hard_negatives.parquet"
    rows = pq.read_table(data).slice(0, args.rows).to_pylist()
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name in args.models:
        (arch, size, extra), more = MODELS[name]
        folder = WORK / "models" / name
        if not (folder / "config.json").is_file():
            make_tiny(folder, arch, size, seed=0, **extra)
        overrides = [*synthetic_overrides(WORK), f"reranker.model.path={folder}", *more]
        for loss in ("full logits", "answer positions"):
            queue = ctx.Queue()
            child = ctx.Process(target=measure, args=(overrides, rows, loss, args.steps, queue))
            child.start()
            results.setdefault(name, {})[loss] = queue.get()
            child.join()
        old, new = results[name]["full logits"], results[name]["answer positions"]
        # the same loss values, from fewer logits
        torch.testing.assert_close(
            torch.tensor(new["losses"]), torch.tensor(old["losses"]), rtol=1e-4, atol=1e-4
        )
        results[name]["speedup"] = old["s_per_step"] / new["s_per_step"]
        results[name]["peak_rss_ratio"] = old["peak_rss_mb"] / new["peak_rss_mb"]
        print(
            f"{name}: {new['sequences']} sequences x {new['tokens']} tokens; full logits "
            f"{old['s_per_step']:.2f} s/step, {old['peak_rss_mb']:.0f} MB; answer positions "
            f"{new['s_per_step']:.2f} s/step, {new['peak_rss_mb']:.0f} MB "
            f"({results[name]['speedup']:.2f}x faster, peak RSS / {results[name]['peak_rss_ratio']:.2f})",
            flush=True,
        )
    report = {
        "args": vars(args),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "results": results,
    }
    (OUT / "rerank_loss.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {OUT / 'rerank_loss.json'}")


if __name__ == "__main__":
    main()
