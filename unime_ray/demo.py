"""The whole path on the embedded default, on CPU, in minutes: synthetic world -> tiny real-architecture
models -> mining (embed, FAISS top-N, MLLM judge, hard-negative sampling) on a local Ray ->
MMEB-style evaluation through a Ray Data actor pool.

    unime-ray demo                                   # jobs/configs/tiny.yaml, local Ray on 127.0.0.1
    unime-ray demo --set mining.beta=0.05            # any config key; finished stages are reused

Each stage writes its outputs under run.output_dir; the world and the tiny models are built only when
missing, and a rerun resumes like the mining job does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from unime_ray.assets import prepare_synthetic
from unime_ray.config import Config, add_config_args, config_from_args
from unime_ray.data.mmeb import read_folder
from unime_ray.eval.mmeb import evaluate_mmeb
from unime_ray.io import write_json
from unime_ray.mining.pipeline import run_mining
from unime_ray.ray_utils import init_ray


def run_demo(cfg: Config) -> dict:
    out = Path(cfg.run.output_dir)
    prepare_synthetic(cfg)
    init_ray(cfg.ray.address)
    mining = run_mining(cfg)
    sample = mining["sample"]
    report: dict = {
        "mining": {
            "queries": mining["ingest"]["queries"],
            "quarantined_pairs": mining["ingest"]["read"]["rows_in"] - mining["ingest"]["read"]["rows_out"],
            "judged_pairs": sum(
                pq.ParquetFile(f).metadata.num_rows for f in (out / "mining/judge/results").glob("*.parquet")
            ),
            "hard_negative_queries": sample["queries_out"],
            "fallback_queries": sample["fallback"],
        }
    }
    evals = read_folder(cfg.data.eval_dir, "eval", image_root=cfg.data.image_root)
    evals.write_quarantine(out / "quarantine_eval.parquet")
    report["read_eval"] = evals.counts()
    scores = evaluate_mmeb(evals.table, cfg.embedder, cfg.data.image_root, cfg.mining.num_actors)
    report["mmeb_p@1_untrained"] = scores
    print(f"mined hard negatives: {report['mining']}")
    print(f"  -> {out / 'mining/sample/hard_negatives.parquet'}, plot {out / 'mining/sample/scores.png'}")
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
