"""The method's claims on real data in one command: the judge, soft scores against hard labels, and
the reranker's gain (docs/experiment-log.md, "The method's claims on real data"), through the project's
own commands, by the benches that measured them one at a time.

Stages, on the Fashion-MNIST world (image -> one of 10 class captions) and the random-weight mid Qwen2-VL:
1. `build`: `make-world --source fashion-mnist` and `make-tiny --size mid` (bench/reranker_rank.py's);
2. `teacher`: oracle-mined hard negatives of the train split, then `train-embed` and `train-rerank` on
   them (reranker_rank's run). The reranker is judge (b), a teacher that saw no eval data; the embedder
   is the one whose top 10 item 3 reranks;
3. `judge_b`, and `judge_a` with `--fastvlm` (an aligned FastVLM, zero-shot): real judge calls on
   held-out rows, the AUCs and the false-negative filter (bench/real_judge.py);
4. `mine`: judge (b) mines the first `--train-rows` training photos (bench/soft_vs_hard.py), with its
   scores' figures on them;
5. `soft_vs_hard`: `train-embed` soft / hard / in-batch x `--seeds`, held-out P@1 (soft_vs_hard.py);
6. `rerank_mined`: `train-rerank` on the judge-mined file;
7. `gain_teacher`, `gain_mined`: `eval` of the teacher's embedder with each reranker, on the held-out
   split and on `--own-queries` of that reranker's own training photos: listwise, and pointwise with
   p(Yes) alone and fused with the cosine at each of `--alphas`. The reranking with the best P@1 on its
   own training photos is the one whose held-out gain counts.

Each stage writes its figures into OUT/results.json as it ends and is skipped when they are there; the
commands inside resume as well (mining stages, training checkpoints, eval caches, soft_vs_hard's finished
runs), so a stopped run continues. `--only` runs some stages. The summary (`--results`, and a markdown
table on stdout) sets every figure beside its goal with met / not met.

    python bench/method_claims.py --out runs/claims        # the logged run's sizes: hours on 2 cores
    python bench/method_claims.py --out runs/claims-quick --quick       # every stage, a few minutes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import real_judge
import reranker_rank
import soft_vs_hard
from commands import ROOT, Stages, run, weights

from unime_ray.config import load_config
from unime_ray.io import write_json

JUDGE_AUC_GOAL = 0.85  # held-out AUC of the positive against the non-matches
RERANK_GAIN_GOAL = 5.0  # points of held-out P@1 over the embedder alone
QUICK = {  # --quick: every stage at a size that runs in minutes
    "train_size": 60,
    "eval_size": 40,
    "teacher_steps": 4,
    "judge_held_out": 20,
    "fastvlm_held_out": 10,
    "train_rows": 60,
    "eval_rows": 40,
    "steps": 3,
    "seeds": "0",
    "rerank_steps": 4,
    "own_queries": 20,
    "alphas": "0.3",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="working folder (world, model, runs, results.json)")
    p.add_argument(
        "--results",
        default="",
        help="summary JSON (default: bench/results/method_claims.json; with --quick OUT/method_claims.json)",
    )
    p.add_argument("--quick", action="store_true", help="every stage at a few minutes' size (QUICK)")
    p.add_argument("--fastvlm", default="", help="an aligned FastVLM folder: also judge (a), zero-shot")
    p.add_argument("--train-size", type=int, default=3000, help="the world's training photos")
    p.add_argument("--eval-size", type=int, default=1000, help="the world's held-out photos")
    p.add_argument("--teacher-steps", type=int, default=300, help="the teacher run's embedder and reranker")
    p.add_argument("--lr", type=float, default=2e-3, help="every training run's learning rate")
    p.add_argument("--judge-held-out", type=int, default=200, help="held-out queries judge (b) scores")
    p.add_argument("--fastvlm-held-out", type=int, default=100, help="held-out queries judge (a) scores")
    p.add_argument("--train-rows", type=int, default=1000, help="training photos judge (b) mines")
    p.add_argument("--eval-rows", type=int, default=500, help="held-out photos soft_vs_hard evaluates")
    p.add_argument("--negatives", type=int, default=8, help="hard negatives per query (mined and trained)")
    p.add_argument("--steps", type=int, default=80, help="soft_vs_hard's train-embed steps (batch 16)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rerank-steps", type=int, default=300, help="the reranker on the judge-mined file")
    p.add_argument("--own-queries", type=int, default=500, help="own training photos that choose alpha")
    p.add_argument("--alphas", default="0.1,0.2,0.3,0.5,0.7", help="fusion alphas (1, p(Yes) alone, always)")
    p.add_argument("--only", default="", help="run only the stages whose names start with these (comma list)")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if not args.results:
        quick = Path(args.out) / "method_claims.json"
        args.results = str(quick if args.quick else ROOT / "bench/results/method_claims.json")
    return args


# ------------------------------------------------------------------------------------------ stages


def teacher_args(out: Path, args: argparse.Namespace) -> argparse.Namespace:
    """reranker_rank's settings for the world, the model and the teacher run, all in `out`."""
    return reranker_rank.parse_args(
        ["--out", str(out), "--train-size", str(args.train_size), "--eval-size", str(args.eval_size),
         "--steps", str(args.teacher_steps), "--lr", str(args.lr)]
    )  # fmt: skip


def teacher(out: Path, args: argparse.Namespace) -> dict:
    """The oracle-mined teacher run: its commands' seconds and its weights."""
    _, times = reranker_rank.train(out, teacher_args(out, args))
    return {
        "seconds": {k: round(v) for k, v in times.items()},
        "embedder": weights(out, "embed"),
        "reranker": weights(out, "rerank"),
    }


def judge(out: Path, name: str, model: str, adapter: str, held_out: int, image_size: int) -> dict:
    """real_judge's figures of one judge on the first `held_out` held-out rows of the world."""
    argv = ["--out", str(out / f"judge_{name}"), "--judge", model, "--judge-adapter", adapter,
            "--world", str(out / "world"), "--held-out", str(held_out),
            "--image-size", str(image_size)]  # fmt: skip
    return real_judge.measure(real_judge.parse_args(argv))


def judge_b_args(out: Path, args: argparse.Namespace) -> argparse.Namespace:
    """soft_vs_hard's settings: judge (b), the teacher's reranker, mines; the mid model trains."""
    model = str(out / "models/mid")
    return soft_vs_hard.parse_args(
        ["--world", str(out / "world"), "--model", model, "--judge", model,
         "--judge-adapter", weights(out, "rerank"), "--out", str(out / "soft_vs_hard"),
         "--train-rows", str(args.train_rows), "--eval-rows", str(args.eval_rows),
         "--negatives", str(args.negatives), "--steps", str(args.steps), "--lr", str(args.lr),
         "--seeds", args.seeds]
    )  # fmt: skip


def mine(svh: argparse.Namespace) -> dict:
    """Judge (b) mines the training rows; real_judge's figures of its scores there (against labels)."""
    out, world, _, seconds = soft_vs_hard.prepare(svh)
    beta = load_config(svh.config, []).mining.beta
    return {
        "mine_seconds": round(seconds),
        "beta": beta,
        **real_judge.figures(real_judge.judged(out, world), beta),
    }


def rerank_mined(out: Path, svh: argparse.Namespace, args: argparse.Namespace) -> dict:
    """`train-rerank` on judge (b)'s mined file, with the teacher's settings but `--rerank-steps`."""
    run_dir, (_, world, hard, _) = out / "rerank_mined", soft_vs_hard.prepare(svh)
    rr = reranker_rank.parse_args(
        ["--out", str(run_dir), "--steps", str(args.rerank_steps), "--lr", str(args.lr),
         "--set", f"reranker.data_path={hard}"]
    )  # fmt: skip
    cfg = [
        "--config",
        "jobs/configs/tiny.yaml",
        *reranker_rank.settings(run_dir, out / "models/mid", world, rr),
    ]
    seconds = run("train-rerank", *cfg)
    return {"seconds": round(seconds), "reranker": weights(run_dir, "rerank"), "trained_on": str(hard)}


def gain(out: Path, args: argparse.Namespace, name: str, reranker: str, own_world: Path) -> dict:
    """P@1 of the teacher's embedder alone and reranked by `reranker` (listwise; pointwise alone and
    fused at each alpha), on `--own-queries` of the reranker's training photos (`own_world`'s train
    split) and on the held-out split; eval caches the embeddings and the reranker's answers, so each
    alpha after the first costs no model call."""
    cfg = reranker_rank.command_settings(out, teacher_args(out, args))
    rows = len((own_world / "train/FashionMNIST.jsonl").read_text().splitlines())
    own = reranker_rank.train_as_eval(own_world, out / f"own_{name}", min(args.own_queries, rows), seed=0)
    embedder, figures = weights(out, "embed"), {}
    for split, eval_dir in (("own_training", own), ("held_out", out / "world/eval")):
        res = out / f"eval_{name}" / split
        both = reranker_rank.eval_split(cfg, eval_dir, res, embedder, reranker)
        row = {k: both[k] for k in ("embedding", "listwise")} | {"pointwise alpha 1": both["pointwise"]}
        row["unparsed"] = both.get("unparsed", 0)
        for alpha in map(float, args.alphas.split(",")):
            fused = reranker_rank.eval_split(
                cfg, eval_dir, res.with_name(f"{split}-alpha{alpha:g}"), embedder, reranker,
                "--rerank", "pointwise", "--set", f"eval.fusion_alpha={alpha}",
            )  # fmt: skip
            row[f"pointwise alpha {alpha:g}"] = fused["pointwise"]
        figures[split] = row
    return {"reranker": reranker, **figures}


def build(out: Path, args: argparse.Namespace) -> dict:
    return {"seconds": {k: round(v) for k, v in reranker_rank.build(out, teacher_args(out, args)).items()}}


# ------------------------------------------------------------------------------------------ summary


def choose(own: dict[str, float]) -> str:
    """The reranking (listwise, or pointwise at an alpha) with the best P@1 on the reranker's own training
    photos: the one applied held-out, so that nothing is chosen on held-out figures. Ties go to the
    larger alpha, then to pointwise over listwise."""

    def alpha(mode: str) -> float:
        return float(mode.rsplit(" ", 1)[1]) if mode.startswith("pointwise alpha ") else -1.0

    modes = [m for m in own if m == "listwise" or alpha(m) >= 0]
    return max(modes, key=lambda m: (own[m], alpha(m)))


def rerank_verdict(figures: dict) -> dict:
    """The chosen reranking's held-out P@1 against the embedder's, and whether it gains RERANK_GAIN_GOAL."""
    mode, held = choose(figures["own_training"]), figures["held_out"]
    gained = round(held[mode] - held["embedding"], 2)
    return {"chosen": mode, "embedding": held["embedding"], "reranked": held[mode], "gain": gained,
            "met": gained >= RERANK_GAIN_GOAL}  # fmt: skip


def soft_hard_verdict(p1: dict[str, dict]) -> dict:
    """The goal soft >= hard > in-batch beyond the seed spread, on one dataset's P@1 per variant ({mean,
    spread, seeds}): soft's mean at least hard's, and hard's mean above in-batch's by more than the larger
    of their two spreads (max - min over the seeds). With one seed there is no spread to exceed: met is
    None (not measurable)."""
    soft, hard, in_batch = p1["soft"], p1["hard"], p1["in-batch"]
    margin = max(hard["spread"], in_batch["spread"])
    checks = {
        "soft >= hard": soft["mean"] >= hard["mean"],
        "hard > in-batch beyond spread": hard["mean"] - in_batch["mean"] > margin,
    }
    one_seed = min(len(v["seeds"]) for v in (soft, hard, in_batch)) < 2
    return {**checks, "margin": margin, "met": None if one_seed else all(checks.values())}


def summarise(results: dict) -> dict:
    """Every figure of items 1-3 that the stages in `results` (OUT/results.json) hold, each goal's
    verdict beside it, and the stages' seconds; a stage not run yet leaves its part out."""
    out: dict = {"goals": {
        "judge": f"held-out AUC of the positive against the non-matches >= {JUDGE_AUC_GOAL}",
        "soft_vs_hard": "held-out P@1: soft >= hard > in-batch, beyond the seed spread",
        "rerank": f"held-out P@1, reranked as chosen on own training photos >= embedder + {RERANK_GAIN_GOAL}",
    }}  # fmt: skip
    judges = {n: results[f"judge_{n}"] for n in ("a", "b") if f"judge_{n}" in results}
    out["judge"] = {
        n: {"met": j["auc_positive_vs_non_matches"] >= JUDGE_AUC_GOAL}
        | {k: v for k, v in j.items() if k != "settings"}
        for n, j in judges.items()
    }
    if "mine" in results:
        out["mining"] = results["mine"]
    if "soft_vs_hard" in results:
        by_variant = results["soft_vs_hard"]["p@1"]
        datasets = next(iter(by_variant.values()))
        out["soft_vs_hard"] = {
            d: {"p@1": (p1 := {v: t[d] for v, t in by_variant.items()})} | soft_hard_verdict(p1)
            for d in datasets
        }
    out["rerank"] = {
        name: rerank_verdict(results[f"gain_{name}"])
        | {k: results[f"gain_{name}"][k] for k in ("own_training", "held_out")}
        for name in ("teacher", "mined")
        if f"gain_{name}" in results
    }
    out["seconds"] = {k: round(v["stage_seconds"]) for k, v in results.items() if "stage_seconds" in v}
    return out


VERDICT = {True: "met", False: "**not met**", None: "not measurable (one seed)"}


def markdown(summary: dict) -> str:
    """The summary as one table: claim, figures, goal, verdict."""
    rows = ["| claim | figures | goal | verdict |", "|---|---|---|---|"]
    for name, j in summary["judge"].items():
        rows.append(
            f"| 1. judge ({name}), {j['queries']} held-out queries "
            f"| AUC {j['auc_positive_vs_non_matches']:.3f}, "
            f"p(Yes) {j['mean_score_positive']:.2f} / {j['mean_score_non_matches']:.2f} | "
            f">= {JUDGE_AUC_GOAL} | {VERDICT[j['met']]} |"
        )
    for dataset, v in summary.get("soft_vs_hard", {}).items():
        cells = " / ".join(
            f"{k} {v['p@1'][k]['mean']} ({v['p@1'][k]['spread']})" for k in soft_vs_hard.VARIANTS
        )
        rows.append(
            f"| 2. soft vs hard, {dataset} P@1 mean (spread) | {cells} | soft >= hard > in-batch "
            f"beyond {v['margin']} | {VERDICT[v['met']]} |"
        )
    for name, r in summary["rerank"].items():
        rows.append(
            f"| 3. reranker ({name}), held-out P@1 "
            f"| embedder {r['embedding']}, {r['chosen']} {r['reranked']} "
            f"({r['gain']:+.1f}) | >= +{RERANK_GAIN_GOAL} | {VERDICT[r['met']]} |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "results")}
    stage = Stages(out / "results.json", settings, [k for k in args.only.split(",") if k], "method-claims")
    taught = stage("build", build, out, args) and stage("teacher", teacher, out, args)
    if taught:
        stage(
            "judge_b", judge, out, "b", str(out / "models/mid"), taught["reranker"], args.judge_held_out, 56
        )
        if args.fastvlm:
            stage("judge_a", judge, out, "a", args.fastvlm, "", args.fastvlm_held_out, 96)
        stage("gain_teacher", gain, out, args, "teacher", taught["reranker"], out / "world")
        svh = judge_b_args(out, args)
        if stage("mine", mine, svh):
            stage("soft_vs_hard", soft_vs_hard.measure, svh)
            reranked = stage("rerank_mined", rerank_mined, out, svh, args)
            if reranked:
                stage(
                    "gain_mined", gain, out, args, "mined", reranked["reranker"], out / "soft_vs_hard/world"
                )
    summary = summarise(stage.read())
    write_json(summary, args.results)
    print(markdown(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
