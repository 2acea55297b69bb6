"""The command line of `unime-ray judge-agree` (usage in the package docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

from unime_ray.config import Config, add_config_args, config_from_args, load_config
from unime_ray.mining.agree.cost import LLM_PARAMS_B, PROJECT_BLOCK, PX_PER_IMAGE_TOKEN, VISION_PARAMS_B
from unime_ray.mining.agree.run import judge_agree


def _config_b(args) -> Config:
    """Setting B's config: `--against` (a config file, or A's config with B's scores) + `--against-set`."""
    against = args.against
    if against and Path(against).suffix in (".yaml", ".yml"):
        return load_config(against, args.against_set)
    overrides = [*args.overrides, *args.against_set]
    if against:
        if not Path(against).exists():
            raise SystemExit(f"[judge-agree] --against {against}: no such config, score file or folder")
        overrides += ["judge.backend=precomputed", f"judge.scores_path={Path(against).resolve()}"]
    return load_config(args.config, overrides)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unime-ray judge-agree",
        description="Judge a seeded sample of a run's mined queries with two judge settings; report their "
        "agreement (rank correlation, false-negative drops, hard-negative overlap, fallbacks) and their "
        "measured tokens, cache hits and projected GPU-hours.",
    )
    add_config_args(p, default="jobs/configs/tiny.yaml")
    p.add_argument(
        "--against",
        default="",
        help="setting B: a config file (its judge section), or a score "
        "file (query_id, cand_id, score) or folder of judge score files; default: A's config",
    )
    p.add_argument(
        "--against-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for setting B's config, e.g. judge.model.image_size=448 (repeatable)",
    )
    p.add_argument("--queries", type=int, default=100, help="queries in the sample (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--out", default="", help="output folder (default <run.output_dir>/judge_agree)")
    p.add_argument(
        "--calls",
        type=float,
        default=None,
        help="judge calls of the full run to project to (default: the run's own; paper: 33.8e6)",
    )
    p.add_argument(
        "--project-image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="project each setting (A [B]) at images of PX x PX "
        f"(Qwen2-VL tokens: (PX/{PX_PER_IMAGE_TOKEN})^2)",
    )
    p.add_argument(
        "--project-block-size",
        type=int,
        default=PROJECT_BLOCK,
        help=f"KV block size of the projected run's prefix cache (default {PROJECT_BLOCK}: vLLM's on GPUs)",
    )
    p.add_argument(
        "--llm-params-b",
        type=float,
        default=LLM_PARAMS_B,
        help="language model size for the projection (billions)",
    )
    p.add_argument(
        "--vision-params-b",
        type=float,
        default=VISION_PARAMS_B,
        help="vision encoder size for the projection (billions)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    from unime_ray.assets import prepare_synthetic
    from unime_ray.ray_utils import init_ray
    from unime_ray.runlock import command_lock

    args = _parser().parse_args(argv)
    cfg, cfg_b = config_from_args(args), _config_b(args)
    with command_lock(cfg.run.output_dir, "judge-agree"):
        prepare_synthetic(cfg)
        prepare_synthetic(cfg_b)
        px = args.project_image_size or [None]
        sizes = (px[0], px[1] if len(px) > 1 else px[0])
        init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
        out = Path(args.out) if args.out else Path(cfg.run.output_dir) / "judge_agree"
        judge_agree(
            cfg,
            cfg_b.judge,
            args.queries,
            out,
            seed=args.seed,
            calls=args.calls,
            image_sizes=sizes,
            llm_params_b=args.llm_params_b,
            vision_params_b=args.vision_params_b,
            project_block=args.project_block_size,
        )
    print((out / "agree.md").read_text())
    print(f"[judge-agree] wrote {out / 'agree.json'}, {out / 'agree.md'}, {out / 'scatter.png'}")
