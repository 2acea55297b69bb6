"""The synthetic world and tiny models a config points at, built on demand (`data.synthetic: true`).
Only the world and the models: eval and serve import this, so it imports no pipeline stage (mining
on the world with its oracle judge is `demo.mine_with_oracle`)."""

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
