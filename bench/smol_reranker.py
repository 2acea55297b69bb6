"""The reranker and the judge on a model whose language model is pretrained.

LLaVA-OneVision around SmolLM2-135M-Instruct (`make-tiny --text-model smollm2`, models/smol.py) on the
synthetic world, through the repo's own jobs:

1. `align`: LLaVA's stage 1. The vision tower and projector are random in the built folder; they learn
   to turn the world's images into inputs the pretrained language model reads, from the training scenes'
   image-caption pairs (captioning loss on the caption tokens). The language model stays frozen: its
   English is what the model borrows, and 450 captions of one grammar would only wear it down.
2. `judge` (part 4): the aligned model and the tiny random judge (`--judges`: also the model before
   alignment) each score a seeded sample of the oracle-mined queries' retrieved candidates through
   `judge-agree`'s code, against the oracle judge's scores: score distributions, AUCs, the
   false-negative filter's kappa.
3. `rerank`: the real reranker job (`run_training(cfg, "rerank")`: Ray Train + DeepSpeed ZeRO-2 + LoRA)
   on the oracle-mined world, starting from the aligned model; the random-weight mid Qwen2-VL through
   the same job and data as the same-run baseline.
4. held-out figures (the definitions of docs/experiment-log.md, "The reranker on random weights") on the
   world's MMEB-style eval rows, 8 candidates each: balanced Yes/No accuracy, positive scored above a
   negative of its row, P@1 ranking all 8 by the Yes-probability, and the listwise pick among all 8 in a
   seeded order; for each model before and after its reranker training.

    python bench/smol_reranker.py --out runs/smol-reranker --results bench/results/smol_reranker.json
    python bench/smol_reranker.py --out /tmp/sr --tiny                # a few steps of everything

Each stage writes its figures into `OUT/results.json` as it ends and is skipped when they are there, so
a stopped run continues where it stopped. `--only` runs some stages, so two processes can share the
cores on one OUT once mining is done (docs/experiment-log.md's run: `--only rerank_smol,held_out_smol_after`
beside `--only judge,held_out_mid,held_out_smol_before,rerank_mid`). Costs, figures and the settings'
reasons: docs/experiment-log.md, "SmolLM2-135M as the language model".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from commands import Stages

from unime_ray.config import ModelConfig, load_config
from unime_ray.data.mmeb import data_files, read_eval
from unime_ray.data.synthetic import PHRASES, caption, make_world, paraphrases
from unime_ray.demo import mine_with_oracle
from unime_ray.eval.metrics import precision_at_1
from unime_ray.mining.agree import auc, judge_agree
from unime_ray.models.backbone import load_model, load_processor
from unime_ray.models.embedder import load_image
from unime_ray.models.prompts import render
from unime_ray.models.reranker import Reranker
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import init_ray
from unime_ray.train.align import CAPTION_PROMPT, AlignSettings, held_out_captions, train_projector
from unime_ray.train.export import save_model_folder
from unime_ray.train.loop import run_training

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "jobs/configs/tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working folder (world, models, runs, results.json)")
    p.add_argument("--results", default="", help="copy results.json here at the end")
    p.add_argument("--tiny", action="store_true", help="a few steps of every stage, to check the recipe runs")
    p.add_argument("--vision-size", default="mid", help="tiny.SIZES entry of the random vision tower")
    p.add_argument("--image-size", type=int, default=28, help="image side (28 px: 10 image tokens)")
    p.add_argument("--n-train", type=int, default=150, help="training scenes (4 mined queries each)")
    p.add_argument("--n-eval", type=int, default=48, help="held-out scenes in the world")
    p.add_argument("--eval-rows", type=int, default=8, help="held-out rows per dataset measured")
    p.add_argument("--align-steps", type=int, default=300, help="stage-1 steps")
    p.add_argument("--align-batch", type=int, default=12, help="image-caption pairs per stage-1 step")
    p.add_argument("--align-lr", type=float, default=3e-3, help="stage-1 peak learning rate")
    p.add_argument("--freeze-tower", action="store_true", help="stage 1 trains the projector only")
    p.add_argument("--judge-queries", type=int, default=32, help="mined queries each judge scores")
    p.add_argument(
        "--judges",
        default="random_tiny,smol_aligned",
        help="judges compared with the oracle: random_tiny (tiny.yaml's), smol_aligned, smol_unaligned",
    )
    p.add_argument(
        "--rerank-steps", type=int, default=150, help="reranker job steps (both models; 150: an epoch)"
    )
    p.add_argument("--rerank-batch", type=int, default=4, help="reranker global batch (2 workers)")
    p.add_argument("--rerank-lr", type=float, default=3e-4, help="reranker LoRA learning rate (SmolLM2)")
    p.add_argument("--mid-lr", type=float, default=5e-4, help="mid model's full fine-tuning learning rate")
    p.add_argument("--list-size", type=int, default=3, help="negatives in the listwise training prompt")
    p.add_argument(
        "--only",
        default="",
        help="run only the stages whose names start with one of these (comma list), e.g. to run "
        "rerank_smol in a second process beside the others on one --out; default: all",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_eval, args.eval_rows, args.judge_queries = 24, 24, 4, 4
        args.align_steps, args.rerank_steps = 4, 2
    return args


# ------------------------------------------------------------------------------------------ stage 1


@torch.no_grad()
def greedy_captions(model, processor, scenes: list[tuple[Path, dict]], size: int) -> dict:
    """Greedy captions of held-out scenes (image file, scene): how many equal the canonical caption, and
    how many of the scenes' objects a caption names with their colour and shape and, bound to them in one
    of the paraphrases' word orders, their position (articles aside)."""
    prompt = render(processor.tokenizer, CAPTION_PROMPT)
    exact, named, objects, examples = 0, 0, 0, []
    for i in range(0, len(scenes), 16):
        chunk = scenes[i : i + 16]
        images = [load_image(str(path), "", size) for path, _ in chunk]
        inputs = processor(text=[prompt] * len(chunk), images=images, return_tensors="pt", padding=True)
        ids = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        texts = processor.tokenizer.batch_decode(
            ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for (_, scene), text in zip(chunk, texts, strict=True):
            text = text.strip()
            exact += text == caption(scene)
            objects += len(scene)
            bare = re.sub(r"\ban? ", "", text)  # the article is grammar, not what the image shows
            named += sum(
                any(
                    phrase in bare
                    for phrase in (  # the object as the paraphrases word it, position bound to it
                        f"{o['colour']} {o['shape']} {PHRASES[o['position']]}",
                        f"{PHRASES[o['position']]} there is {o['colour']} {o['shape']}",
                    )
                )
                for o in scene
            )
            examples.append([caption(scene), text])
    return {
        "exact": 100 * exact / len(scenes),
        "objects_named": 100 * named / objects,
        "examples": examples[:8],
    }


def align(base: Path, out: Path, world: Path, args: argparse.Namespace) -> dict:
    """LLaVA's stage 1 on the world's training captions (three paraphrases per scene); writes the aligned
    model folder `out`. Only the vision side trains (tower, projector, image_newline: every parameter
    outside LANGUAGE_PARAMS), or with `--freeze-tower` the projector alone."""
    scenes = json.loads((world / "world.json").read_text())["scenes"]
    images = world / "images"
    train = [(images / p, c) for p, s in scenes.items() if p.startswith("train/") for c in paraphrases(s)]
    held_scenes = [(images / p, s) for p, s in scenes.items() if p.startswith("eval/")]
    held = [(path, caption(s)) for path, s in held_scenes]
    processor = load_processor(base, padding_side="left")
    model = load_model(base, "float32")
    before = held_out_captions(model, processor, held, "", args.image_size)
    settings = AlignSettings(
        steps=args.align_steps,
        batch=args.align_batch,
        lr=args.align_lr,
        train_tower=not args.freeze_tower,
        seed=args.seed,
    )
    start = time.perf_counter()
    curve = train_projector(model, processor, train, settings, "", args.image_size)
    seconds = time.perf_counter() - start
    after = held_out_captions(model, processor, held, "", args.image_size)
    greedy = greedy_captions(model, processor, held_scenes, args.image_size)
    save_model_folder(model, base, out)
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": args.align_steps,
        "batch": args.align_batch,
        "seconds": seconds,
        "train_loss_first10": float(np.mean(curve[:10])),
        "train_loss_last10": float(np.mean(curve[-10:])),
        "held_out_captions_before": before,
        "held_out_captions_after": after,
        "held_out_greedy_captions_after": greedy,
    }


# ------------------------------------------------------------------------------------------ held out


def held_out(model: ModelConfig, world: Path, rows: int, seed: int) -> dict:
    """The world's MMEB-style eval rows (the first `rows` per dataset, correct candidate first): Yes/No
    scores of all 8 candidates, and one listwise prompt over all 8 in a seeded order. Per dataset and
    their mean: balanced Yes/No accuracy (mean of the Yes rate on positives and the No rate on
    negatives, p_yes > 0.5 is Yes), positive above a negative of its row (%), P@1 ranking by p_yes
    (ties against the positive), listwise P@1 (an unparsed answer counts as wrong) and unparsed (%)."""
    reranker = Reranker(model, world / "images")
    rng = np.random.default_rng(seed)
    per_dataset, start = {}, time.perf_counter()
    for name, path in data_files(world / "eval").items():
        table = read_eval(path, dataset=name, image_root=world / "images").table.slice(0, rows).to_pylist()
        queries = [{"text": r["qry_text"], "image": r["qry_image"]} for r in table]
        cands = [
            [{"text": t, "image": i} for t, i in zip(r["tgt_text"], r["tgt_image"], strict=True)]
            for r in table
        ]
        pairs = [
            (q["text"], q["image"], c["text"], c["image"])
            for q, cs in zip(queries, cands, strict=True)
            for c in cs
        ]
        p = reranker.score(pairs).reshape(len(table), -1).astype(np.float64)
        orders = [rng.permutation(len(cs)) for cs in cands]
        bs = max(1, model.batch_size // 4)
        picks = []
        for i in range(0, len(table), bs):
            shown = [[cands[j][k] for k in orders[j]] for j in range(i, min(i + bs, len(table)))]
            picks += reranker.listwise(queries[i : i + bs], shown)
        pos, neg = p[:, :1], p[:, 1:]
        per_dataset[name] = {
            "balanced": 50 * (float((pos > 0.5).mean()) + float((neg <= 0.5).mean())),
            "yes_rate": 100 * float((p > 0.5).mean()),
            "pos_over_neg": 100 * float(((pos > neg) + 0.5 * (pos == neg)).mean()),
            "p1_pointwise": 100 * precision_at_1(p),
            "p1_listwise": 100
            * float(np.mean([k is not None and o[k] == 0 for k, o in zip(picks, orders, strict=True)])),
            "unparsed": 100 * float(np.mean([k is None for k in picks])),
            "mean_p_yes_pos": float(pos.mean()),
            "mean_p_yes_neg": float(neg.mean()),
        }
    keys = next(iter(per_dataset.values())).keys()
    mean = {k: float(np.mean([d[k] for d in per_dataset.values()])) for k in keys}
    return {
        "mean": mean,
        "datasets": per_dataset,
        "queries": rows * len(per_dataset),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------ judge


def judge_report(
    name: str, judge_path: Path, image_size: int, overrides: list[str], out: Path, n: int, seed: int
) -> dict:
    """`judge-agree` of the model at `judge_path` (transformers backend) against the oracle judge on a
    seeded sample of `n` mined queries, plus the score distributions and AUCs it does not report."""
    cfg = load_config(
        CONFIG,
        overrides
        + [
            "judge.backend=transformers",
            f"judge.model.path={judge_path}",
            f"judge.model.image_size={image_size}",
            "judge.model.batch_size=16",
            "mining.num_actors=2",
        ],
    )
    oracle = load_config(CONFIG, overrides).judge  # mine_with_oracle's precomputed oracle scores
    start = time.perf_counter()
    result = judge_agree(cfg, oracle, n, out / name, seed=seed)
    seconds = time.perf_counter() - start
    keys = ["query_id", "cand_id"]
    a = pa.concat_tables(pq.read_table(f) for f in sorted((out / name / "A").glob("*.parquet")))
    b = pa.concat_tables(
        pq.read_table(f, columns=[*keys, "score"]) for f in sorted((out / name / "B").glob("*.parquet"))
    )
    both = (
        a.select([*keys, "is_positive", "score"]).join(b.rename_columns([*keys, "oracle"]), keys).to_pydict()
    )
    score, oracle_true = np.asarray(both["score"], np.float64), np.asarray(both["oracle"]) > 0.5
    positive = np.asarray(both["is_positive"], bool)

    def quantiles(x: np.ndarray) -> dict:
        return (
            {
                "n": len(x),
                "mean": float(x.mean()),
                **{f"p{q}": float(np.percentile(x, q)) for q in (10, 50, 90)},
            }
            if len(x)
            else {"n": 0}
        )

    agreement = result["agreement"]
    return {
        "judge": str(judge_path),
        "queries": agreement["queries"],
        "pairs": agreement["pairs"],
        "seconds": seconds,
        "positives": quantiles(score[positive]),
        "true_candidates": quantiles(score[~positive & oracle_true]),
        "negatives": quantiles(score[~oracle_true]),
        "auc_positive_vs_negatives": auc(score[positive | ~oracle_true], positive[positive | ~oracle_true]),
        "auc_vs_oracle": auc(score, oracle_true),
        "kendall_vs_oracle_median": agreement["kendall"]["median"],
        "false_negative_filter": agreement["false_negative_filter"],
        "hard_negatives_jaccard_median": agreement["hard_negatives_jaccard"]["median"],
    }


def train_reranker(cfg) -> dict:
    """The real reranker job; its checkpoint's weights and the last quarter of its training metrics."""
    summary = run_training(cfg, "rerank")
    metrics = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    last = metrics[-max(1, len(metrics) // 4) :]
    return {
        "weights": summary["weights"],
        "steps": len(metrics),
        "train_seconds": metrics[-1]["time"] - metrics[0]["time"],
        "last_quarter": {k: float(np.mean([m[k] for m in last])) for k in ("loss", "yes_no_acc", "list_acc")},
    }


# ------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"

    settings = {k: v for k, v in vars(args).items() if k not in ("only", "results")}
    stage = Stages(results_file, settings, [k for k in args.only.split(",") if k], "smol-reranker")

    run, world = out / "run", out / "run" / "world"
    models = out / "models"
    smol, aligned, mid = models / "smol", models / "smol-aligned", models / "mid"
    if not (world / "world.json").is_file():
        make_world(world, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
    for folder, build in (
        (smol, lambda: make_tiny(smol, "llava-ov", args.vision_size, seed=args.seed, text_model="smollm2")),
        (mid, lambda: make_tiny(mid, "qwen2-vl", "mid", seed=args.seed, spread_answers=False)),
    ):
        if not (folder / "config.json").is_file():
            build()

    stage("align", align, smol, aligned, world, args)
    init_ray(num_cpus=2)
    # mining as the learning test does it: the tiny config's random embedder retrieves, the oracle judges
    overrides = mine_with_oracle(CONFIG, run)
    data = run / "mining/sample/hard_negatives.parquet"

    judges = {
        "random_tiny": (run / "models/qwen2-vl", 56),
        "smol_unaligned": (smol, args.image_size),
        "smol_aligned": (aligned, args.image_size),
    }
    for name in args.judges.split(","):
        path, px = judges[name]
        stage(
            f"judge_{name}",
            judge_report,
            name,
            path,
            px,
            overrides,
            out / "judge",
            args.judge_queries,
            args.seed,
        )

    common = [
        f"reranker.data_path={data}",
        f"reranker.steps={args.rerank_steps}",
        f"reranker.checkpoint_every={args.rerank_steps}",
        f"reranker.global_batch_size={args.rerank_batch}",
        f"reranker.micro_batch_size={args.rerank_batch // 2}",
        "reranker.num_workers=2",
        f"reranker.warmup_steps={max(1, args.rerank_steps // 10)}",
        f"reranker.list_size={args.list_size}",
        f"run.seed={args.seed}",
    ]
    setups = {  # the cheap baseline first
        "mid": (mid, 56, ["reranker.lora.enabled=false", f"reranker.lr={args.mid_lr}"]),
        "smol": (
            aligned,
            args.image_size,
            ["reranker.lora.rank=16", "reranker.lora.alpha=32", f"reranker.lr={args.rerank_lr}"],
        ),
    }
    for name, (path, px, more) in setups.items():
        model = ModelConfig(path=str(path), dtype="float32", image_size=px, max_length=1024, batch_size=16)
        stage(f"held_out_{name}_before", held_out, model, world, args.eval_rows, args.seed)
        cfg = load_config(
            CONFIG,
            overrides
            + common
            + more
            + [
                f"run.output_dir={out / ('rerank_' + name)}",
                f"reranker.model.path={path}",
                f"reranker.model.image_size={px}",
            ],
        )

        trained = stage(f"rerank_{name}", train_reranker, cfg)
        if trained is None:
            continue
        weights = Path(trained["weights"])
        after = (
            dataclasses.replace(model, adapter=str(weights))
            if (weights / "adapter_config.json").is_file()
            else dataclasses.replace(model, path=str(weights))
        )
        stage(f"held_out_{name}_after", held_out, after, world, args.eval_rows, args.seed)

    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(results_file, args.results)
    return stage.read()


if __name__ == "__main__":
    main()
