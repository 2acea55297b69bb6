"""Does the pretrained eye matter? The embedder trained on a real-data world, with the FastVLM that can
see (EfficientNet-Lite0 + SmolLM2-135M, projector aligned by `unime-ray align`) and with the random
"mid" Qwen2-VL, the same way, through the project's own commands.

For each model: `mine` (retrieve with the model, the oracle judge's label scores as bring-your-own
judge scores, sample), `eval` of the untrained model, `train-embed` (LoRA), `eval` of the trained
adapter. Both models train on the same data with the same steps, batch and negatives; the learning
rate is each model's own (LoRA on a pretrained 135M LM wants a smaller one than the random 3M model).

    python bench/real_embed.py --out runs/real-embed --results bench/results/real_embed.json
    python bench/real_embed.py --out /tmp/re --steps 2 --train-size 40 --eval-size 20 --align-steps 2

A stage whose output exists is skipped (the commands' own resume), so a stopped run continues.
Figures, costs and the settings' reasons: docs/experiment-log.md, "A model that can see".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from commands import overrides, run, scores, weights, world_settings

MODELS = {  # name -> (config, image size)
    "fast-vlm": ("jobs/configs/fastvlm.yaml", 96),
    "mid": ("jobs/configs/tiny.yaml", 56),
}


def settings(out: Path, model: Path, world: Path, size: int, lr: float, args) -> list[str]:
    s = {
        **world_settings(out, world),
        "embedder.path": model,
        "embedder.image_size": size,
        "judge.model.path": model,
        "mining.num_actors": 2,
        "train.model.path": model,
        "train.model.image_size": size,
        "train.num_workers": 2,
        "train.steps": args.steps,
        "train.lr": lr,
        "train.global_batch_size": args.batch,
        "train.micro_batch_size": 2,
        "train.num_negatives": args.negatives,
        "train.checkpoint_every": args.steps,
    }
    return overrides(s)


def build(out: Path, args) -> dict[str, Path]:
    """The world and the two models (FastVLM aligned by `unime-ray align`); returns the model folders."""
    world, models = out / "world", out / "models"
    if not (world / "world.json").is_file():
        run("make-world", str(world), "--source", args.source, "--train-size", str(args.train_size),
            "--eval-size", str(args.eval_size))  # fmt: skip
    if not (models / "fast-vlm/config.json").is_file():
        run("make-tiny", str(models / "fast-vlm"), "--arch", "fast-vlm", "--text-model", "smollm2",
            "--image-size", str(MODELS["fast-vlm"][1]))  # fmt: skip
    if not (models / "mid/config.json").is_file():
        run("make-tiny", str(models / "mid"), "--arch", "qwen2-vl", "--size", "mid")
    aligned = models / "fast-vlm-aligned"
    cfg = settings(out / "align", models / "fast-vlm", world, MODELS["fast-vlm"][1], 0.0, args)
    run("align", str(aligned), "--config", MODELS["fast-vlm"][0], *cfg, "--steps", str(args.align_steps),
        "--batch", "8")  # fmt: skip
    return {"fast-vlm": aligned, "mid": models / "mid"}


def one_model(name: str, model: Path, out: Path, world: Path, args) -> dict:
    """mine -> eval before -> train-embed -> eval after for one model; P@1 per dataset and the times."""
    (config, size), lr = MODELS[name], getattr(args, f"lr_{name.replace('-', '_')}")
    run_dir = out / name
    cfg = ["--config", config, *settings(run_dir, model, world, size, lr, args)]
    times = {}
    if not (run_dir / "mining/sample/hard_negatives.parquet").is_file():
        from unime_ray.data.real import oracle_scores

        times["retrieve"] = run("mine", *cfg, "--until", "retrieve")
        oracle = oracle_scores(run_dir, world)
        times["mine"] = run(
            "mine", *cfg, "--set", "judge.backend=precomputed", "--set", f"judge.scores_path={oracle}"
        )
    times["eval_before"] = run("eval", *cfg, "--model", str(model), "--out", str(run_dir / "eval_before"))
    times["train_embed"] = run("train-embed", *cfg)
    times["eval_after"] = run(
        "eval", *cfg, "--model", weights(run_dir, "embed"), "--out", str(run_dir / "eval_after")
    )
    return {
        "lr": lr,
        "image_size": size,
        "before": scores(run_dir / "eval_before"),
        "after": scores(run_dir / "eval_after"),
        "seconds": {k: round(v) for k, v in times.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/real-embed")
    p.add_argument("--results", default="")
    p.add_argument("--source", default="emoji", help="make-world --source")
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--align-steps", type=int, default=120)
    p.add_argument("--steps", type=int, default=60, help="train-embed steps")
    p.add_argument("--batch", type=int, default=8, help="train-embed global batch (queries per step)")
    p.add_argument("--negatives", type=int, default=3, help="hard negatives per query in train-embed")
    p.add_argument("--models", default="fast-vlm,mid")
    p.add_argument("--lr-fast-vlm", type=float, default=2e-4, help="LoRA learning rate of the FastVLM")
    p.add_argument("--lr-mid", type=float, default=2e-3, help="LoRA learning rate of the mid model")
    args = p.parse_args()
    out = Path(args.out).resolve()
    start = time.perf_counter()
    models = build(out, args)
    figures = {
        name: one_model(name, models[name], out, out / "world", args) for name in args.models.split(",")
    }
    world = json.loads((out / "world/world.json").read_text())["datasets"]
    summary = {
        "settings": vars(args),
        "chance": {name: d["chance"] for name, d in world.items()},
        "align": json.loads((models["fast-vlm"] / "align.json").read_text()),
        "models": figures,
        "seconds": round(time.perf_counter() - start),
    }
    summary["align"].pop("inputs")
    print(json.dumps({k: v for k, v in summary.items() if k != "align"}, indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
