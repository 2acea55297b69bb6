"""Does the reranker rank? The embedder and the reranker trained on the same real class-label task,
then both asked to rank each query's candidates, on held-out queries and on the reranker's own
training queries, through the project's own commands.

The task: Fashion-MNIST (`make-world --source fashion-mnist`), image -> one of 10 class captions. Mined
with the oracle judge (label match, so no class-mate is a negative), the random-weight "mid" Qwen2-VL
trained as embedder and as reranker on the same hard negatives, then `unime-ray eval --rerank
pointwise listwise` on the world's eval split and on a sample of training queries written in the eval
format (all 10 captions each). Every step is a `unime-ray` command run as a subprocess.

    python bench/reranker_rank.py --out runs/rr --results bench/results/reranker_rank.json
    python bench/reranker_rank.py --out /tmp/rr --steps 10 --train-queries 50   # a quick pass

A stage whose output exists is skipped, so a stopped run continues; `--set` is passed to both training
jobs (e.g. `--set reranker.point_negatives=1` for the paper's pairwise term alone).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from commands import overrides, run, scores, weights, world_settings


def train_as_eval(world: Path, out: Path, n: int, seed: int) -> Path:
    """`n` seeded training queries in the eval format, each ranking all the world's captions (its own
    first): the reranker's own training queries, held to the same test as the eval split."""
    rows = [json.loads(line) for line in (world / "train/FashionMNIST.jsonl").read_text().splitlines()]
    captions = sorted({r["pos_text"] for r in rows})
    rng = random.Random(seed)
    lines = []
    for r in rng.sample(rows, n):
        others = [c for c in captions if c != r["pos_text"]]
        rng.shuffle(others)
        tgt = [r["pos_text"], *others]
        lines.append(
            {
                "qry_text": r["qry"],
                "qry_img_path": r["qry_image_path"],
                "tgt_text": tgt,
                "tgt_img_path": [""] * 10,
            }
        )
    (out / "FashionMNIST.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (out / "FashionMNIST.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def settings(out: Path, model: Path, world: Path, args) -> list[str]:
    s = {
        **world_settings(out, world),
        "embedder.path": model,
        "judge.model.path": model,
    }
    for section in ("train", "reranker"):
        s.update(
            {
                f"{section}.model.path": model,
                f"{section}.num_workers": 2,
                f"{section}.steps": args.steps,
                f"{section}.lr": args.lr,
                f"{section}.checkpoint_every": args.steps,
            }
        )
    return overrides(s) + [x for kv in args.set for x in ("--set", kv)]


def ranking_checks(out: Path) -> list[dict]:
    """The reranker job's own ranking checks (`reranker.monitor_queries`), step by step."""
    lines = (out / "train_rerank/metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if any(k.endswith("p@1") and "_" in k for k in r)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rr")
    p.add_argument("--results", default="")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-queries", type=int, default=500)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for both training jobs")
    args = p.parse_args()
    out = Path(args.out).resolve()
    world, model = out / "world", out / "models/mid"
    times = {}
    if not (world / "world.json").is_file():
        times["world"] = run("make-world", str(world), "--source", "fashion-mnist")
    if not (model / "config.json").is_file():
        times["model"] = run("make-tiny", str(model), "--arch", "qwen2-vl", "--size", "mid")
    s = settings(out, model, world, args)
    cfg = ["--config", "jobs/configs/tiny.yaml", *s]
    hard = out / "mining/sample/hard_negatives.parquet"
    if not hard.is_file():
        times["retrieve"] = run("mine", *cfg, "--until", "retrieve")
        from unime_ray.data.real import oracle_scores

        oracle = oracle_scores(out, world)
        times["mine"] = run(
            "mine", *cfg, "--set", "judge.backend=precomputed", "--set", f"judge.scores_path={oracle}"
        )
    times["train_embed"] = run("train-embed", *cfg)
    times["train_rerank"] = run("train-rerank", *cfg)
    own = train_as_eval(world, out / "train_as_eval", args.train_queries, seed=0)
    figures = {}
    for split, eval_dir in (("held_out", world / "eval"), ("own_training", own)):
        res = out / f"eval_{split}"
        times[f"eval_{split}"] = run(
            "eval", *cfg, "--set", f"data.eval_dir={eval_dir}", "--out", str(res),
            "--model", weights(out, "embed"), "--reranker", weights(out, "rerank"),
        )  # fmt: skip
        (figures[split],) = scores(res).values()
    summary = {"settings": vars(args), "seconds": times, "p@1": figures, "checks": ranking_checks(out)}
    print(json.dumps(summary, indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
