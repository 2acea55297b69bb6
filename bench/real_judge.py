"""Does the judge judge? Real judge calls (`unime-ray mine` with `judge.backend=transformers`) on a
real-data world, measured against the world's ground truth (its labels: same label = a true match).

The judge is a model folder (`--judge`; the reranker's adapter on it with `--judge-adapter`), e.g.
the FastVLM aligned by `unime-ray align` (zero-shot: the paper's judge is a pretrained MLLM that never
saw the training pairs) or that model plus a reranker adapter trained on the TRAIN split only.
Candidates are retrieved by `--embedder` (default: the judge's model). With `--world W --held-out N`
the judged pairs are the first N held-out rows per dataset of an existing world W (written as training
pairs: what a judge trained on W's train split has never seen); otherwise a new world is built.

Figures, from the mined judge scores and `oracle_scores`' truth:
- AUC of each query's positive against its retrieved candidates that are not true matches;
- AUC of true matches against non-matches over every scored (query, candidate) (the positives included);
- the queries with a non-match scored at or above their positive;
- the false-negative filter (drop s > s_pos - beta): how many candidates it drops, how many of those are
  true matches, and how many of the retrieved true matches it catches;
- judge seconds per call (the backend's own measure, model loading excluded).

    python bench/real_judge.py --out runs/real-judge --judge runs/real-embed/models/fast-vlm-aligned \
        --results bench/results/real_judge.json
    python bench/real_judge.py --out /tmp/rj --judge MODEL --train-size 10 --eval-size 10   # quick pass
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from commands import overrides, run, world_settings

from unime_ray.config import load_config
from unime_ray.mining.agree import auc


def settings(out: Path, world: Path, args) -> list[str]:
    embedder = args.embedder or args.judge
    s = {
        **world_settings(out, world),
        "embedder.path": embedder,
        "embedder.image_size": args.image_size,
        "judge.backend": "transformers",
        "judge.model.path": args.judge,
        "judge.model.adapter": args.judge_adapter,
        "judge.model.image_size": args.image_size,
        "judge.model.batch_size": 8,
        "mining.top_n": args.top_n,
        "mining.num_actors": 2,
    }
    return overrides(s)


def held_out_world(world: Path, out: Path, n: int) -> Path:
    """A world whose training pairs are the first `n` held-out rows per dataset of `world` (query and
    its correct target), with `world`'s images and labels (`world.json`), for mining them."""
    import shutil

    from unime_ray.data.mmeb import data_files

    out.mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir(exist_ok=True)
    for name, path in data_files(world / "eval").items():
        rows = [json.loads(line) for line in path.read_text().splitlines()][:n]
        pairs = [
            {"qry": r["qry_text"], "qry_image_path": r["qry_img_path"], "pos_text": r["tgt_text"][0],
             "pos_image_path": r["tgt_img_path"][0]}
            for r in rows
        ]  # fmt: skip
        (out / "train" / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    shutil.copy(world / "world.json", out / "world.json")
    if not (out / "images").exists():
        (out / "images").symlink_to((world / "images").resolve())
    shutil.copytree(world / "eval", out / "eval", dirs_exist_ok=True)
    return out


def judged(out: Path, world: Path) -> pa.Table:
    """Every judged (query, candidate) with its judge score, whether it is the positive, and `true`: the
    world's truth (same label) from `oracle_scores`."""
    from unime_ray.data.real import oracle_scores

    scores = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "mining/judge/results").glob("*.parquet"))]
    ).select(["query_id", "cand_id", "is_positive", "score", "seconds"])
    truth = pq.read_table(oracle_scores(out, world)).rename_columns(["query_id", "cand_id", "true"])
    table = scores.join(truth, ["query_id", "cand_id"], join_type="left outer")
    if table["true"].null_count:
        raise RuntimeError(f"{table['true'].null_count} judged pairs have no truth in {out}/oracle.parquet")
    return table


def figures(table: pa.Table, beta: float) -> dict:
    """The AUCs and the false-negative filter's counts (module docstring) of one judged table."""
    rows = table.to_pandas()
    pos = rows[rows.is_positive].set_index("query_id")["score"]
    cands = rows[~rows.is_positive].copy()
    cands["s_pos"] = pos.reindex(cands.query_id).to_numpy()
    cands["dropped"] = cands.score > cands.s_pos - beta
    non = cands[cands.true == 0]
    versus = rows[rows.is_positive | (rows.true == 0)]
    true_cands = cands[cands.true == 1]
    return {
        "queries": int(len(pos)),
        "judge_calls": int(len(rows)),
        "auc_positive_vs_non_matches": auc(versus.score.to_numpy(), versus.is_positive.to_numpy()),
        "auc_true_vs_non_matches": auc(rows.score.to_numpy(), (rows.true == 1).to_numpy()),
        "mean_score_positive": float(pos.mean()),
        "mean_score_non_matches": float(non.score.mean()),
        "queries_negative_at_or_above_positive": int(
            (non.score >= non.s_pos).groupby(non.query_id).any().sum()
        ),
        "fn_filter_dropped": int(cands.dropped.sum()),
        "fn_filter_dropped_true": int((cands.dropped & (cands.true == 1)).sum()),
        "retrieved_true_matches": int(len(true_cands)),
        "retrieved_true_matches_caught": int(true_cands.dropped.sum()),
        "seconds_per_call": float(np.nanmean(rows.seconds.to_numpy(dtype=float))),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/real-judge")
    p.add_argument("--results", default="")
    p.add_argument("--judge", required=True, help="judge model folder")
    p.add_argument("--judge-adapter", default="", help="peft adapter on the judge (a trained reranker)")
    p.add_argument("--embedder", default="", help="retrieving model folder (default: the judge's)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--source", default="emoji", help="make-world --source")
    p.add_argument("--train-size", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=50)
    p.add_argument("--top-n", type=int, default=9, help="candidates judged per query (+ its positive)")
    p.add_argument("--world", default="", help="an existing world whose held-out rows are judged")
    p.add_argument("--held-out", type=int, default=100, help="with --world: held-out rows per dataset")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Mine the judged world (the mining stages resume) and return the module docstring's figures."""
    out = Path(args.out).resolve()
    world = out / "world"
    if args.world:
        world = held_out_world(Path(args.world).resolve(), out / "held_out_world", args.held_out)
    elif not (world / "world.json").is_file():
        run("make-world", str(world), "--source", args.source, "--train-size", str(args.train_size),
            "--eval-size", str(args.eval_size))  # fmt: skip
    sets = settings(out, world, args)
    seconds = run("mine", "--config", "jobs/configs/fastvlm.yaml", *sets)
    beta = load_config("jobs/configs/fastvlm.yaml", sets[1::2]).mining.beta
    return {
        "settings": vars(args),
        "beta": beta,
        "mine_seconds": round(seconds),
        **figures(judged(out, world), beta),
    }


def main(argv: list[str] | None = None) -> dict:
    summary = measure(parse_args(argv))
    print(json.dumps(summary, indent=1))
    if summary["settings"]["results"]:
        Path(summary["settings"]["results"]).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
