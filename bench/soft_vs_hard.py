"""Soft scores against hard labels (the paper's Table 4) on a real-data world, through the project's
own commands.

1. `mine` the world's first `--train-rows` training pairs with a real judge (`judge.backend=transformers`:
   `--judge` model folder, plus `--judge-adapter`, e.g. a reranker trained on the same train split and
   never on eval data): hard negatives carrying the judge's soft scores.
2. `train-embed` on those hard negatives three ways, each seed's data order and LoRA initialisation the
   same across the three (`run.seed`), the same steps, batch and learning rate:
   - soft: the paper's loss (`train.loss=jeffreys`), the target a softmax of the judge's scores;
   - hard: InfoNCE over the positive and the same hard negatives (`train.loss=infonce`), one-hot;
   - in-batch: InfoNCE with no hard negatives (`train.num_negatives=0`), the batch's other positives.
   `--set KEY=VALUE` changes every training run (a sweep: e.g. `train.tau=0.1`), in its own folders.
3. `eval` every trained adapter on the world's held-out rows (the first `--eval-rows`); P@1 per variant as
   mean and spread over the seeds.

    python bench/soft_vs_hard.py --world runs/real-fm/world --model runs/real-fm/models/mid \
        --judge runs/real-fm/models/mid --judge-adapter RERANKER_ADAPTER --out runs/soft-vs-hard \
        --results bench/results/soft_vs_hard.json
    python bench/soft_vs_hard.py ... --train-rows 40 --eval-rows 20 --steps 2 --seeds 0   # quick pass

A stage whose output exists is skipped, so a stopped run continues. Figures and costs:
docs/experiment-log.md, "The method's claims".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from commands import overrides, run, scores, weights, world_settings

from unime_ray.io import write_json

VARIANTS = {  # name -> settings that differ
    "soft": {"train.loss": "jeffreys"},
    "hard": {"train.loss": "infonce"},
    "in-batch": {"train.loss": "infonce", "train.num_negatives": 0},
}


def subset_world(world: Path, out: Path, train_rows: int, eval_rows: int) -> Path:
    """A world with the first rows of each of `world`'s train and eval files, its images linked."""
    if (out / "world.json").is_file():
        return out
    for split, n in (("train", train_rows), ("eval", eval_rows)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for path in sorted((world / split).glob("*.jsonl")):
            lines = path.read_text().splitlines(keepends=True)[:n]
            (out / split / path.name).write_text("".join(lines))
    (out / "images").symlink_to((world / "images").resolve())
    (out / "world.json").write_text((world / "world.json").read_text())
    return out


def base_settings(out: Path, world: Path, args) -> dict:
    return {
        **world_settings(out, world),
        "embedder.path": args.model,
        "embedder.image_size": args.image_size,
        "train.model.path": args.model,
        "train.model.image_size": args.image_size,
        "train.num_workers": 2,
        "train.steps": args.steps,
        "train.lr": args.lr,
        "train.warmup_steps": 5,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 8,
        "train.num_negatives": args.negatives,
        "train.checkpoint_every": args.steps,
    }


def mine(out: Path, world: Path, args) -> tuple[Path, float]:
    """The judge-mined hard negatives of the world's training rows, and the mining seconds (0: found)."""
    hard = out / "mining/sample/hard_negatives.parquet"
    if hard.is_file():
        return hard, 0.0
    judge = {
        "judge.backend": "transformers",
        "judge.model.path": args.judge,
        "judge.model.adapter": args.judge_adapter,
        "judge.model.image_size": args.image_size,
        "mining.num_actors": 2,
        "mining.top_n": args.negatives + 1,
        "mining.num_negatives": args.negatives,
    }
    seconds = run("mine", "--config", args.config, *overrides({**base_settings(out, world, args), **judge}))
    return hard, seconds


def train_and_eval(out: Path, world: Path, hard: Path, variant: str, seed: int, args) -> dict:
    """One trained adapter's held-out P@1 per dataset, and the seconds of its training and eval; kept
    in the run's `figures.json`, which a rerun reads instead of starting the two commands again."""
    tag = "".join(f"-{kv.replace('=', '')}" for kv in args.set)
    run_dir = out / f"{variant}{tag}-seed{seed}"
    if (run_dir / "figures.json").is_file():
        return json.loads((run_dir / "figures.json").read_text())
    s = {**base_settings(run_dir, world, args), "run.seed": seed, "train.data_path": hard}
    s.update({**VARIANTS[variant], **dict(kv.split("=", 1) for kv in args.set)})
    cfg = ["--config", args.config, *overrides(s)]
    times = {"train_embed": run("train-embed", *cfg)}
    times["eval"] = run("eval", *cfg, "--model", weights(run_dir, "embed"), "--out", str(run_dir / "eval"))
    figures = {"p@1": scores(run_dir / "eval"), "seconds": {k: round(v) for k, v in times.items()}}
    write_json(figures, run_dir / "figures.json")
    return figures


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per variant and dataset: mean and spread (max - min) of P@1 over the seeds."""
    table: dict[str, dict] = {}
    for variant, by_seed in runs.items():
        datasets = next(iter(by_seed.values()))["p@1"]
        for name in datasets:
            values = [r["p@1"][name]["embedding"] for r in by_seed.values()]
            table.setdefault(variant, {})[name] = {
                "mean": round(statistics.fmean(values), 2),
                "spread": round(max(values) - min(values), 2),
                "seeds": values,
            }
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="a make-world folder")
    p.add_argument("--model", required=True, help="the embedder's base model folder")
    p.add_argument("--judge", required=True, help="the judge's model folder")
    p.add_argument("--judge-adapter", default="", help="peft adapter on the judge (a trained reranker)")
    p.add_argument("--config", default="jobs/configs/tiny.yaml")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--out", default="runs/soft-vs-hard")
    p.add_argument("--results", default="")
    p.add_argument("--train-rows", type=int, default=1200)
    p.add_argument("--eval-rows", type=int, default=500)
    p.add_argument("--negatives", type=int, default=8, help="hard negatives per query (mined and trained)")
    p.add_argument("--steps", type=int, default=100, help="train-embed steps (global batch 16)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every training run (a sweep)")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, float]:
    """The output folder, the world subset, its judge-mined hard negatives and the mining seconds (0
    when they were mined before)."""
    out = Path(args.out).resolve()
    world = subset_world(Path(args.world).resolve(), out / "world", args.train_rows, args.eval_rows)
    hard, mine_seconds = mine(out, world, args)
    return out, world, hard, mine_seconds


def measure(args: argparse.Namespace) -> dict:
    """Mine (unless mined), then every variant x seed not yet trained and evaluated; the summary."""
    start = time.perf_counter()
    out, world, hard, mine_seconds = prepare(args)
    runs = {
        v: {int(s): train_and_eval(out, world, hard, v, int(s), args) for s in args.seeds.split(",")}
        for v in args.variants.split(",")
    }
    return {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "mine_seconds": round(mine_seconds),
        "p@1": summarise(runs),
        "runs": runs,
        "seconds": round(time.perf_counter() - start),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = measure(args)
    print(json.dumps(summary["p@1"], indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
