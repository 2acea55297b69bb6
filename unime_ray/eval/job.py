"""The evaluation job: the paper's protocol on whatever data the config points at, tables and plots out.

    unime-ray eval --config CONFIG --model CKPT [--reranker CKPT] [--rerank listwise pointwise]

Suites (each runs when its data is given, or as listed in `eval.suites`):
- MMEB (`data.eval_dir`, any subset of the 36 datasets, plus MMEB-format sets of your own): P@1 of each
  query over its own candidate list; Table 1's meta-task, IND, OOD and Overall averages.
- image-text retrieval (`eval.retrieval` files): Recall@1/5/10 over the full gallery, both directions.
- SugarCrepe-style compositional (`eval.compositional` files): accuracy of true over altered caption.
With reranking (`eval.rerank`), every suite is also scored after the reranker reorders the embedding
top-K (`eval.top_k`), listwise and/or pointwise: Table 3.

Embeddings come from a Ray Data actor pool and are cached by (model, dataset) under `eval.cache_dir`;
so are reranker answers. Outputs in `eval.output_dir`: results.json (every number), results.md (the
tables), mmeb.png and recall.png. A synthetic world (`world.json` beside `data.eval_dir`) supplies its
retrieval and compositional files and its datasets' meta-tasks when the config names none.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from unime_ray.assets import prepare_synthetic
from unime_ray.config import Config, ConfigError, add_config_args, config_from_args
from unime_ray.data.mmeb import read_folder
from unime_ray.eval.cache import embed_collections
from unime_ray.eval.compositional import load_compositional
from unime_ray.eval.groups import parse_meta_tasks
from unime_ray.eval.mmeb import mmeb_collections
from unime_ray.eval.plots import mmeb_bars, recall_curves
from unime_ray.eval.ranking import Collection, rank
from unime_ray.eval.report import build_results, markdown
from unime_ray.eval.rerank import MODES, rerank
from unime_ray.eval.retrieval import load_retrieval
from unime_ray.io import atomic_path, write_json
from unime_ray.ray_utils import init_ray
from unime_ray.record import record_stage, stage_key
from unime_ray.runlock import command_lock
from unime_ray.tracking import log_stage, numbers


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(model folder, adapter folder) of a checkpoint: a Hugging Face model folder as is, or a peft
    adapter on the base model its adapter_config.json names."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return path, ""
    if (folder / "adapter_config.json").is_file():
        return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"], path
    raise FileNotFoundError(f"{path}: neither a model folder (config.json) nor a peft adapter")


def load_collections(cfg: Config, out: Path) -> tuple[list[Collection], dict[str, str], dict]:
    """The suites' datasets as collections, the meta-tasks of non-MMEB sets, and read counts."""
    e = cfg.eval
    if e.top_k < 1 or not e.recall_ks or min(e.recall_ks) < 1:
        raise ConfigError(f"eval.top_k ({e.top_k}) and eval.recall_ks ({e.recall_ks}) must be >= 1")
    # a synthetic world describes its own eval files and meta-tasks in world.json beside eval/
    world_dir = Path(cfg.data.eval_dir).parent
    world_file = world_dir / "world.json"
    world = json.loads(world_file.read_text()) if cfg.data.eval_dir and world_file.is_file() else {}
    meta = {n: d["meta_task"] for n, d in world.get("datasets", {}).items()} | parse_meta_tasks(e.meta_tasks)
    retrieval = e.retrieval or ([str(world_dir / world["retrieval"])] if "retrieval" in world else [])
    compositional = e.compositional or [str(world_dir / f) for f in world.get("compositional", {}).values()]
    given = {
        "mmeb": bool(cfg.data.eval_dir),
        "retrieval": bool(retrieval),
        "compositional": bool(compositional),
    }
    suites = e.suites or [s for s, ok in given.items() if ok]
    keys = {"mmeb": "data.eval_dir", "retrieval": "eval.retrieval", "compositional": "eval.compositional"}
    missing = [keys[s] for s in suites if not given[s]]
    if missing or not suites:
        raise ConfigError(
            f"nothing to evaluate for suites {suites or list(keys)}: set {missing or list(keys.values())}"
        )
    image_root = e.image_root or cfg.data.image_root
    collections, read = [], {}
    if "mmeb" in suites:
        res = read_folder(
            cfg.data.eval_dir,
            "eval",
            datasets=cfg.data.datasets or None,
            image_root=cfg.data.image_root,
            check_images=cfg.data.check_images,
            allow_absolute_images=cfg.data.allow_absolute_images,
        )
        if res.quarantine.num_rows:
            res.write_quarantine(out / "quarantine_mmeb.parquet")
        read["mmeb"] = res.counts()
        collections += mmeb_collections(res.table, cfg.data.image_root)
    if "retrieval" in suites:
        collections += [
            load_retrieval(
                f,
                image_root,
                split=e.split,
                max_captions=e.max_captions,
                image_prompt=e.image_prompt,
                caption_prompt=e.caption_prompt,
                allow_absolute_images=cfg.data.allow_absolute_images,
            )
            for f in retrieval
        ]
    if "compositional" in suites:
        absolute = cfg.data.allow_absolute_images
        collections += [load_compositional(f, image_root, e.image_prompt, absolute) for f in compositional]
    return collections, meta, read


def _describe(model) -> str:
    return model.path + (f" + adapter {model.adapter}" if model.adapter else "")


def run_eval(cfg: Config) -> dict:
    e = cfg.eval
    out = Path(e.output_dir or Path(cfg.run.output_dir) / "eval")
    cache = Path(e.cache_dir or Path(cfg.run.output_dir) / "cache")
    prepare_synthetic(cfg)
    collections, meta, read = load_collections(cfg, out)
    changed, started = record_stage(cfg, out), time.time()
    if changed:
        print(f"[eval] {out} was last written with other settings, now: {', '.join(changed)}", flush=True)
    init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
    pool = {"num_actors": e.num_actors, "gpus_per_actor": e.gpus_per_actor}
    vectors, embedded = embed_collections(collections, cfg.embedder, cache, shard_rows=e.shard_rows, **pool)
    ranked = {(c.key, t.name): rank(t, vectors[c.key], e.top_k) for c in collections for t in c.tasks}
    ranks = {(c, t, "embedding"): r.ranks for (c, t), r in ranked.items()}
    unparsed, reranked_now = {}, 0
    if e.rerank:
        jobs = [(c, t, ranked[(c.key, t.name)]) for c in collections for t in c.tasks]
        more, unparsed, reranked_now = rerank(
            jobs, e.rerank, cfg.reranker.model, cache, alpha=e.fusion_alpha, **pool
        )
        ranks.update(more)
    results = build_results(collections, ranks, ["embedding", *e.rerank], unparsed, meta, e.recall_ks)
    results["settings"] = {
        "embedder": _describe(cfg.embedder),
        "reranker": _describe(cfg.reranker.model) if e.rerank else "none",
        "top_k": e.top_k,
        "fusion_alpha": e.fusion_alpha,
    }
    results["work"] = {
        "items_embedded": embedded["embedded"],
        "items_cached": embedded["cached"],
        "rerank_requests_computed": reranked_now,
    }
    results["read"] = read
    write_json(results, out / "results.json")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(results) + "\n")
    plots = [
        p for p in (mmeb_bars(results, out / "mmeb.png"), recall_curves(results, out / "recall.png")) if p
    ]
    print(f"[eval] wrote {out}/results.json, results.md, " + ", ".join(p.name for p in plots), flush=True)
    params = {"eval": asdict(e), "embedder": asdict(cfg.embedder), "reranker": asdict(cfg.reranker.model)}
    artifacts = [out / "results.json", out / "results.md", *plots]
    log_stage(
        cfg,
        stage_key(Path(cfg.run.output_dir), out),
        started,
        params=params,
        metrics=numbers(results),
        artifacts=artifacts,
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="unime-ray eval", description=__doc__.split("\n")[0])
    add_config_args(p, default="jobs/configs/tiny.yaml", run=True)
    p.add_argument("--model", help="embedder checkpoint: a model folder or a peft adapter (embedder.path)")
    p.add_argument("--adapter", help="peft adapter on the embedder (embedder.adapter)")
    p.add_argument(
        "--reranker", help="reranker checkpoint: a model folder or a peft adapter (reranker.model)"
    )
    p.add_argument("--reranker-adapter", help="peft adapter on the reranker (reranker.model.adapter)")
    p.add_argument(
        "--rerank", nargs="+", choices=MODES, help="reranking modes (default with --reranker: both)"
    )
    p.add_argument("--out", help="results folder (eval.output_dir)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.model:
        cfg.embedder.path, cfg.embedder.adapter = resolve_checkpoint(args.model)
    if args.adapter:
        cfg.embedder.adapter = args.adapter
    if args.reranker:
        cfg.reranker.model.path, cfg.reranker.model.adapter = resolve_checkpoint(args.reranker)
    if args.reranker_adapter:
        cfg.reranker.model.adapter = args.reranker_adapter
    if args.rerank:
        cfg.eval.rerank = args.rerank
    elif args.reranker and not cfg.eval.rerank:
        cfg.eval.rerank = list(MODES)
    if args.out:
        cfg.eval.output_dir = args.out
    print("[eval] started", flush=True)
    start = time.perf_counter()
    with command_lock(cfg.run.output_dir, "eval"):
        results = run_eval(cfg)
    print(markdown(results))
    table = "; ".join(
        f"{mode} " + ", ".join(f"{col} {v:.1f}" for col, v in row.items() if v is not None)
        for mode, row in results["table3"].items()
    )
    print(f"[eval] done in {time.perf_counter() - start:.1f} s: {table}", flush=True)
    return results
