"""The synthetic world and tiny models a config points at, built on demand (`data.synthetic: true`)."""

from __future__ import annotations

from pathlib import Path

from unime_ray.config import Config
from unime_ray.data.synthetic import make_world
from unime_ray.models.tiny import make_tiny


def prepare_synthetic(cfg: Config) -> None:
    """Build the synthetic world and the tiny models at the paths the config names, if missing."""
    if not cfg.data.synthetic:
        return
    world = Path(cfg.data.image_root).parent
    if not (world / "world.json").is_file():
        make_world(world, seed=cfg.run.seed)
    for path in {cfg.embedder.path, cfg.judge.model.path, cfg.train.model.path, cfg.reranker.model.path}:
        if path and not (Path(path) / "config.json").is_file():
            make_tiny(path, "qwen2-vl", seed=cfg.run.seed)


def synthetic_overrides(out: str | Path) -> list[str]:
    """`--set` overrides that move the tiny config's run, world and models under folder `out`."""
    models = ("embedder.path", "judge.model.path", "train.model.path", "reranker.model.path")
    return [
        f"run.output_dir={out}",
        f"data.train_dir={out}/world/train",
        f"data.eval_dir={out}/world/eval",
        f"data.image_root={out}/world/images",
        *(f"{key}={out}/models/qwen2-vl" for key in models),
    ]


def mine_with_oracle(config: str | Path, out: str | Path, extra: list[str] | None = None) -> list[str]:
    """Mine the synthetic world under `out` with the world's ORACLE judge scores (what a judge MLLM that
    knows the world would say; the tiny random judge knows nothing), for training that can learn.

    Runs the mining job to its retrieve stage, scores every retrieved pair with the oracle, then lets
    the judge stage take those scores (`judge.backend=precomputed`) and sample hard negatives. Returns
    the overrides (`synthetic_overrides(out)` + `extra` + the oracle judge) that reproduce this setup."""
    from unime_ray.config import load_config
    from unime_ray.data.synthetic import write_oracle_scores
    from unime_ray.mining.pipeline import run_mining

    out = Path(out)
    overrides = synthetic_overrides(out) + list(extra or [])
    cfg = load_config(config, overrides)
    prepare_synthetic(cfg)
    run_mining(cfg, ("retrieve",))
    oracle = write_oracle_scores(
        sorted((out / "mining/retrieve").glob("*.parquet")),
        out / "mining/ingest",
        Path(cfg.data.image_root).parent / "world.json",
        out / "oracle.parquet",
    )
    overrides += ["judge.backend=precomputed", f"judge.scores_path={oracle}"]
    run_mining(load_config(config, overrides))
    return overrides
