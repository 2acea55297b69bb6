"""The whole path on the embedded default, on CPU, in minutes: synthetic world -> tiny real-architecture
models -> mining (embed, FAISS top-N, MLLM judge, hard-negative sampling) -> embedder and reranker
training (Ray Train, DeepSpeed ZeRO-2, LoRA) -> evaluation before/after training, with the reranker ->
a corpus index and the Ray Serve app on 127.0.0.1, asked one query over HTTP -> shut down.

    unime-ray demo                                   # jobs/configs/tiny.yaml, local Ray on 127.0.0.1
    unime-ray demo --set train.steps=10 --set reranker.steps=10    # quicker
    unime-ray demo --set mining.beta=0.05            # any config key; finished stages are reused

Every stage writes under run.output_dir; the world and the tiny models are built only when missing,
and a rerun reuses finished mining stages and training checkpoints. The tiny models start from random
weights and the tiny judge knows nothing, so the numbers show the plumbing, not the method's gains
(tests/test_learning.py shows learning with the synthetic world's oracle judge).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shlex
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from unime_ray.assets import prepare_synthetic, synthetic_overrides
from unime_ray.config import Config, ServeConfig, add_config_args, config_from_args, load_config
from unime_ray.data.synthetic import write_oracle_scores
from unime_ray.eval.compare import compare
from unime_ray.eval.job import resolve_checkpoint, run_eval
from unime_ray.io import write_json
from unime_ray.mining.pipeline import run_mining
from unime_ray.ray_utils import init_ray, start_serve, stop_serve
from unime_ray.runlock import command_lock
from unime_ray.train import run


def mine_with_oracle(config: str | Path, out: str | Path, extra: list[str] | None = None) -> list[str]:
    """Mine the synthetic world under `out` with the world's ORACLE judge scores (what a judge MLLM that
    knows the world would say; the tiny random judge knows nothing), for training that can learn.

    Runs the mining job to its retrieve stage, scores every retrieved pair with the oracle, then lets
    the judge stage take those scores (`judge.backend=precomputed`) and sample hard negatives. Returns
    the overrides (`synthetic_overrides(out)` + `extra` + the oracle judge) that reproduce this setup."""
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


def mine(cfg: Config) -> dict:
    out = Path(cfg.run.output_dir)
    mining = run_mining(cfg)
    return {
        "queries": mining["ingest"]["queries"],
        "quarantined_pairs": mining["ingest"]["read"]["rows_in"] - mining["ingest"]["read"]["rows_out"],
        "judged_pairs": sum(
            pq.ParquetFile(f).metadata.num_rows for f in (out / "mining/judge/results").glob("*.parquet")
        ),
        "hard_negative_queries": mining["sample"]["queries_out"],
        "fallback_queries": mining["sample"]["fallback"],
    }


def train(cfg: Config, kind: str) -> dict:
    """One training run; returns its weights (adapter/ or model/), last metrics and learning-curve plot."""
    summary = run.train(cfg, kind)
    keep = ("step", "loss", "p@1", "samples_per_s")
    return {
        "weights": summary["weights"],
        "metrics": {k: summary["metrics"][k] for k in keep if k in summary["metrics"]},
        "curves": summary["curves"],
    }


def evaluate(cfg: Config, embedder: str, reranker: str) -> dict:
    """MMEB-style tables for the untrained embedder, then the trained embedder with the trained
    listwise reranker, and the table of deltas between them."""
    out = Path(cfg.run.output_dir) / "eval"
    before = copy.deepcopy(cfg)
    before.eval.output_dir, before.eval.rerank = str(out / "untrained"), []
    after = copy.deepcopy(cfg)
    after.eval.output_dir, after.eval.rerank = str(out / "trained"), ["listwise"]
    after.embedder.path, after.embedder.adapter = resolve_checkpoint(embedder)
    after.reranker.model.path, after.reranker.model.adapter = resolve_checkpoint(reranker)
    run_eval(before)
    results = run_eval(after)
    deltas = compare(out / "untrained", out / "trained", out / "compare")
    return {"table3": results["table3"], "compare": deltas["out"]}


def serve_one_query(cfg: Config, embedder: str, reranker: str) -> dict:
    """Index the world's captions with the trained embedder, deploy the Serve app on 127.0.0.1, search
    them with an image over HTTP (listwise rerank on), shut Serve down."""
    from ray import serve

    from unime_ray.serve.app import build_app
    from unime_ray.serve.index import IndexMismatchError, build_index

    cfg = copy.deepcopy(cfg)
    cfg.embedder.path, cfg.embedder.adapter = resolve_checkpoint(embedder)
    cfg.reranker.model.path, cfg.reranker.model.adapter = resolve_checkpoint(reranker)
    cfg.index.items = "texts"  # image -> caption search; "both" would index the images too
    world = Path(cfg.data.image_root).parent
    corpus = world / "retrieval" / "captions.jsonl"
    try:  # an index of these captions by this embedder: kept, only records it lacks are embedded
        index = build_index(cfg, corpus)
    except IndexMismatchError:  # built by another embedder (an earlier run's weights): replaced
        index = build_index(cfg, corpus, rebuild=True)
    image = sorted(Path(cfg.data.image_root).glob("eval/*.png"))[0]
    body = {
        "query": {"image": base64.b64encode(image.read_bytes()).decode(), "instruction": "Find a caption"},
        "top_k": 3,
        "rerank": "listwise",
    }
    host, port = cfg.serve.host, cfg.serve.port
    start_serve(host, port, cfg.ray.verbose)
    try:
        serve.run(build_app(cfg), name="unime-demo", route_prefix="/")
        request = urllib.request.Request(
            f"http://{host}:{port}/v1/search",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    finally:
        stop_serve()
    return {"index": index, "query_image": str(image), "answer": answer}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _train_numbers(metrics: dict) -> str:
    """A training's last logged step in words: step, loss, P@1 in % on its last batch (the positive
    ranked first among 1 + k candidates), throughput."""
    parts = [f"step {metrics['step']}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "p@1" in metrics:
        parts.append(f"P@1 {100 * metrics['p@1']:.2f}% on its last batch")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
    return ", ".join(parts)


def _table(rows: list[tuple[str, float, str, str]]) -> str:
    """The demo's closing summary: stage, seconds, key numbers, where its outputs are."""
    lines = ["| stage | seconds | key numbers | outputs |", "|---|---:|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} | {numbers} | {where} |" for stage, seconds, numbers, where in rows]
    return "\n".join(lines)


def run_demo(cfg: Config) -> dict:
    out = Path(cfg.run.output_dir)
    prepare_synthetic(cfg)
    init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
    report: dict = {}
    rows: list[tuple[str, float, str, str]] = []

    def stage(name: str, work, numbers, where) -> None:
        print(f"[demo] {name}: started", flush=True)
        start = time.perf_counter()
        report[name] = work()
        seconds = time.perf_counter() - start
        rows.append((name, seconds, numbers(report[name]), str(where(report[name]))))
        print(f"[demo] {name}: done in {seconds:.1f} s: {rows[-1][2]}", flush=True)

    stage(
        "mining",
        lambda: mine(cfg),
        lambda m: (
            f"{m['queries']} queries, {m['judged_pairs']} judged pairs, {m['fallback_queries']} fallback"
        ),
        lambda _: out / "mining/sample/hard_negatives.parquet",
    )
    for kind in ("train_embed", "train_rerank"):
        stage(
            kind,
            lambda kind=kind: train(cfg, kind[len("train_") :]),
            lambda t: _train_numbers(t["metrics"]),
            lambda t: t["weights"],
        )
    weights = report["train_embed"]["weights"], report["train_rerank"]["weights"]
    stage(
        "eval",
        lambda: evaluate(cfg, *weights),
        lambda e: (
            "P@1 in % over the synthetic eval sets: "
            + ", ".join(
                f"{mode} {_percent(t.get('MMEB_Other', t.get('MMEB')))}" for mode, t in e["table3"].items()
            )
        ),
        lambda e: e["compare"],
    )
    stage(
        "serve",
        lambda: serve_one_query(cfg, *weights),
        lambda s: "top-{} over HTTP: {}".format(
            len(s["answer"]["results"]), ", ".join(repr(h["text"]) for h in s["answer"]["results"])
        ),
        lambda s: s["index"]["index"],
    )
    write_json(report, out / "demo_report.json")
    print(_table(rows) + f"\n\nreport: {out / 'demo_report.json'}", flush=True)
    print(f"search it in a browser (http://{cfg.serve.host}:{cfg.serve.port}/): {serve_command(cfg)}")
    return report


def serve_command(cfg: Config) -> str:
    """The command that serves this run's index with the embedder and reranker that built it."""
    out = Path(cfg.run.output_dir)
    shown = os.path.relpath(out) if out.is_relative_to(Path.cwd()) else str(out)
    port = "" if cfg.serve.port == ServeConfig().port else f" --set serve.port={cfg.serve.port}"
    return f".venv/bin/unime-ray serve --run {shlex.quote(shown)}{port}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="unime-ray demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    add_config_args(p, default="jobs/configs/tiny.yaml")
    cfg = config_from_args(p.parse_args(argv))
    with command_lock(cfg.run.output_dir, "demo"):
        run_demo(cfg)
