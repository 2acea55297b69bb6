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
jobs (e.g. `--set reranker.point_negatives=1` for the paper's pairwise term alone). With
`--rerank-from embedder` the reranker starts from the trained embedder merged into its base (`unime-ray
export`), not from the untrained model: the embedder has learned which photo goes with which caption,
which the reranker otherwise has to learn from scratch.

    python bench/reranker_rank.py --out runs/rr-emb --rerank-from embedder
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from commands import overrides, run, scores, weights, world_settings


def train_as_eval(world: Path, out: Path, n: int, seed: int) -> Path:
    """`n` seeded training queries in the eval format, each ranking all the captions of the world's
    training rows (its own first; a small world may lack a class): the reranker's own training queries,
    held to the same test as the eval split."""
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
                "tgt_img_path": [""] * len(tgt),
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rr")
    p.add_argument("--results", default="")
    p.add_argument("--train-size", type=int, default=3000, help="make-world: training photos")
    p.add_argument("--eval-size", type=int, default=1000, help="make-world: held-out photos")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-queries", type=int, default=500)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for both training jobs")
    p.add_argument(
        "--rerank-from",
        choices=["base", "embedder"],
        default="base",
        help="the reranker's start: the untrained model, or the trained embedder merged into it",
    )
    return p.parse_args(argv)


def build(out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The Fashion-MNIST world `out/world` and the mid model `out/models/mid`, unless they exist; the
    seconds of what was built."""
    world, model, times = out / "world", out / "models/mid", {}
    if not (world / "world.json").is_file():
        sizes = ["--train-size", str(args.train_size), "--eval-size", str(args.eval_size)]
        times["world"] = run("make-world", str(world), "--source", "fashion-mnist", *sizes)
    if not (model / "config.json").is_file():
        times["model"] = run("make-tiny", str(model), "--arch", "qwen2-vl", "--size", "mid")
    return times


def command_settings(out: Path, args: argparse.Namespace) -> list[str]:
    """The config and settings of every command of the run in `out` (its world, model and steps)."""
    return ["--config", "jobs/configs/tiny.yaml", *settings(out, out / "models/mid", out / "world", args)]


def train(out: Path, args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """Oracle mining of `out/world` (unless mined), then the embedder and the reranker on it (each job
    skips a finished run; the reranker from the merged embedder with `--rerank-from embedder`); the
    command-line settings of the reranker's run and the seconds of each step."""
    world, times = out / "world", {}
    cfg = command_settings(out, args)
    hard = out / "mining/sample/hard_negatives.parquet"
    if not hard.is_file():
        times["retrieve"] = run("mine", *cfg, "--until", "retrieve")
        from unime_ray.data.real import oracle_scores

        oracle = oracle_scores(out, world)
        times["mine"] = run(
            "mine", *cfg, "--set", "judge.backend=precomputed", "--set", f"judge.scores_path={oracle}"
        )
    times["train_embed"] = run("train-embed", *cfg)
    if args.rerank_from == "embedder":
        merged = out / "models/embedder-merged"
        if not (merged / "config.json").is_file():
            times["export"] = run("export", "--run", str(out), str(merged))
        cfg += ["--set", f"reranker.model.path={merged}"]
    times["train_rerank"] = run("train-rerank", *cfg)
    return cfg, times


def eval_split(cfg: list[str], eval_dir: Path, res: Path, embedder: str, reranker: str, *more: str) -> dict:
    """`unime-ray eval` of `embedder` with `reranker` on the eval files of `eval_dir` into `res` (`more`:
    further eval arguments); P@1 per mode of its one dataset, and the command's seconds."""
    seconds = run(
        "eval", *cfg, "--set", f"data.eval_dir={eval_dir}", "--out", str(res),
        "--model", embedder, "--reranker", reranker, *more,
    )  # fmt: skip
    (figures,) = scores(res).values()
    return {**figures, "seconds": round(seconds)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    times = build(out, args)
    cfg, trained = train(out, args)
    own = train_as_eval(out / "world", out / "train_as_eval", args.train_queries, seed=0)
    figures = {
        split: eval_split(cfg, eval_dir, out / f"eval_{split}", weights(out, "embed"), weights(out, "rerank"))
        for split, eval_dir in (("held_out", out / "world/eval"), ("own_training", own))
    }
    times |= trained | {f"eval_{split}": f.pop("seconds") for split, f in figures.items()}
    summary = {"settings": vars(args), "seconds": times, "p@1": figures, "checks": ranking_checks(out)}
    print(json.dumps(summary, indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
