"""The whole path on the embedded default, on CPU, in minutes: synthetic world -> tiny real-architecture
models -> read and validate the data -> embed through a Ray Data actor pool -> MMEB-style P@1.

    unime-ray demo                                   # jobs/configs/tiny.yaml, local Ray on 127.0.0.1
    unime-ray demo --set run.output_dir=/tmp/demo    # (then point data/model paths there too)

Each stage writes its outputs under run.output_dir; the world and the tiny models are rebuilt only
when missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unime_ray.config import Config, add_config_args, config_from_args
from unime_ray.data.mmeb import read_folder
from unime_ray.data.synthetic import make_world
from unime_ray.eval.mmeb import evaluate_mmeb
from unime_ray.io import write_json
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import init_ray


def prepare_assets(cfg: Config) -> None:
    """Build the synthetic world and the tiny models at the paths the config names, if missing."""
    world = Path(cfg.data.image_root).parent
    if not (world / "world.json").is_file():
        make_world(world, seed=cfg.run.seed)
    for path in {cfg.embedder.path, cfg.judge.model.path, cfg.train.model.path, cfg.reranker.model.path}:
        if path and not (Path(path) / "config.json").is_file():
            make_tiny(path, "qwen2-vl", seed=cfg.run.seed)


def run_demo(cfg: Config) -> dict:
    out = Path(cfg.run.output_dir)
    prepare_assets(cfg)
    report: dict = {}
    for kind, folder in (("pairs", cfg.data.train_dir), ("eval", cfg.data.eval_dir)):
        read = read_folder(folder, kind, image_root=cfg.data.image_root, check_images=cfg.data.check_images)
        read.write_quarantine(out / f"quarantine_{kind}.parquet")
        report[f"read_{kind}"] = read.counts()
        print(f"read {kind}: {read.counts()}")
        if kind == "eval":
            eval_table = read.table
    init_ray(cfg.ray.address)
    scores = evaluate_mmeb(eval_table, cfg.embedder, cfg.data.image_root, cfg.mining.num_actors)
    report["mmeb_p@1_untrained"] = scores
    print("MMEB-style P@1 of the untrained tiny embedder (chance = 1/candidates):")
    for name, value in scores.items():
        print(f"  {name:12s} {value:6.1f}")
    write_json(report, out / "demo_report.json")
    print(f"wrote {out / 'demo_report.json'}")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="unime-ray demo", description=__doc__.split("\n")[0])
    add_config_args(p, default="jobs/configs/tiny.yaml")
    run_demo(config_from_args(p.parse_args(argv)))
