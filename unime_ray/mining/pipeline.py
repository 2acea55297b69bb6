"""The mining pipeline: ingest -> embed -> retrieve -> judge -> sample, each stage a folder of Parquet.

    <output_dir>/mining/
      ingest/    queries.parquet, pool.parquet, quarantine.parquet
      embed/     requests/*.parquet -> results/*.parquet          (Ray Data actor pool, sharded)
      retrieve/  <dataset>.parquet                                 (FAISS top-N per dataset)
      judge/     requests/*.parquet -> results/*.parquet          (vLLM / transformers / precomputed)
      sample/    hard_negatives.parquet, hard_negatives.json, report.json, scores.png
      report.json

Resume: a stage that finished writes `_SUCCESS.json` with a fingerprint of the settings it depends on
(and of the stage before it). A rerun skips a stage whose fingerprint matches, continues one that was
interrupted (embed and judge resume by shard), and redoes a stage, and every stage after it, whose
settings changed, naming the keys that did (the marker keeps the settings). So `--set mining.beta=0.02`
re-runs only `sample`, with no judge call. The run's config is recorded in `<output_dir>/run.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from unime_ray.config import Config, output_settings
from unime_ray.engine.shards import requests_once
from unime_ray.io import digest, file_stamp, write_json, write_text
from unime_ray.mining.embed import run_embed
from unime_ray.mining.ingest import run_ingest
from unime_ray.mining.judge import run_judge, write_requests
from unime_ray.mining.retrieve import run_retrieve
from unime_ray.mining.sample import run_sample
from unime_ray.preflight import PreflightError, check_job, check_quarantine
from unime_ray.record import changed_keys, record_stage
from unime_ray.tracking import log_stage, numbers

STAGES = ("ingest", "embed", "retrieve", "judge", "sample")


# Judge settings that change the prompt, hence the scores, with their defaults.
_JUDGE_PROMPT = {"prompt": "paper", "max_candidate_tokens": 0}


def _file_stamp(key: str, path: str) -> dict:
    """Size and modification time of a file a stage reads, so a file replaced in place redoes the stage
    (its path alone would not change)."""
    if not path or not Path(path).is_file():
        return {}
    return {key: file_stamp(path)}


def stage_settings(cfg: Config) -> dict[str, dict]:
    """What each stage's output depends on (besides the stage before it)."""
    m = cfg.mining
    return {
        "ingest": {
            k: v for k, v in asdict(cfg.data).items() if k not in ("eval_dir", "max_quarantined_fraction")
        },
        "embed": {
            "model": output_settings(cfg.embedder),
            "shard": m.embed_shard_rows,
            **_file_stamp("embeddings_file", cfg.embedder.embeddings_path),
        },
        "retrieve": {k: v for k, v in asdict(m).items() if k in ("top_n", "delta", "index", "ivf_nprobe")},
        "judge": {
            "model": output_settings(cfg.judge.model),
            "backend": cfg.judge.backend,
            "scores_path": cfg.judge.scores_path,
            **_file_stamp("scores_file", cfg.judge.scores_path),
            "shard": m.judge_shard_queries,
            # Settings added later enter only when not at their default, so runs made before keep theirs.
            **{
                k: getattr(cfg.judge, k)
                for k, default in _JUDGE_PROMPT.items()
                if getattr(cfg.judge, k) != default
            },
        },
        "sample": {
            "beta": m.beta,
            "interval": m.interval,
            "min_negatives": m.min_negatives,
            "num_negatives": m.num_negatives,
            "seed": cfg.run.seed,
        },
    }


def fingerprints(cfg: Config) -> dict[str, str]:
    out, previous = {}, ""
    for stage, settings in stage_settings(cfg).items():
        out[stage] = previous = digest({"previous": previous, "settings": settings})
    return out


def run_mining(cfg: Config, stages: tuple[str, ...] = STAGES) -> dict:
    """Run (or resume) the pipeline up to and including the last of `stages`."""
    root = Path(cfg.run.output_dir) / "mining"
    dirs = {s: root / s for s in STAGES}
    prints, settings = fingerprints(cfg), stage_settings(cfg)
    changed, started = record_stage(cfg, root), time.time()
    report: dict = {}

    def run(stage: str, fn) -> dict:
        marker = dirs[stage] / "_SUCCESS.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done["fingerprint"] == prints[stage]:
                print(f"[mine] {stage}: done earlier, skipped", flush=True)
                return done["report"]
            if "settings" in done:
                keys = changed_keys(done["settings"], settings[stage], f"{stage}.")
                why = ", ".join(keys) or "the stage before it was redone"
            else:
                why = "its earlier settings were not recorded"
            print(f"[mine] {stage}: settings changed ({why}), redoing it", flush=True)
            shutil.rmtree(dirs[stage])
        elif _stale(dirs[stage], prints[stage]):
            why = ", ".join(changed) or "no record of the earlier settings"
            print(
                f"[mine] {stage}: settings changed since it was interrupted ({why}), redoing it", flush=True
            )
            shutil.rmtree(dirs[stage])
        dirs[stage].mkdir(parents=True, exist_ok=True)
        write_text(prints[stage], dirs[stage] / "_FINGERPRINT")
        print(f"[mine] {stage}: started", flush=True)
        start = time.perf_counter()
        result = fn(dirs[stage])
        result["seconds"] = round(time.perf_counter() - start, 2)
        if stage == "ingest":
            check_quarantine(dirs["ingest"], result, cfg)
        check_not_empty(stage, dirs)
        write_json({"fingerprint": prints[stage], "settings": settings[stage], "report": result}, marker)
        print(f"[mine] {stage}: done in {result['seconds']:.1f} s: {summary(stage, result)}", flush=True)
        return result

    image_root = cfg.data.image_root

    queries, pool = (str(dirs["ingest"] / f"{name}.parquet") for name in ("queries", "pool"))

    def files(stage: str, sub: str = "") -> list[Path]:
        return sorted((dirs[stage] / sub).glob("*.parquet"))

    def judge(d: Path) -> dict:
        candidates = files("retrieve")
        # bring-your-own scores are joined on ids: their requests carry no texts (a backend change
        # redoes the whole stage, so a model judge never finds these)
        texts = cfg.judge.backend != "precomputed"
        requests = requests_once(
            d / "requests", lambda r: write_requests(candidates, queries, pool, r, cfg.mining, texts)
        )
        return run_judge(requests, d / "results", cfg.judge, image_root, cfg.mining)

    steps = {
        "ingest": lambda d: run_ingest(cfg.data, d),
        "embed": lambda d: run_embed(queries, pool, d, cfg.embedder, image_root, cfg.mining),
        "retrieve": lambda d: run_retrieve(files("embed", "results"), queries, d, cfg.mining),
        "judge": judge,
        "sample": lambda d: run_sample(files("judge", "results"), queries, pool, d, cfg.mining, cfg.run.seed),
    }
    last = max(STAGES.index(s) for s in stages)
    for stage in STAGES[: last + 1]:
        report[stage] = run(stage, steps[stage])
    write_json(report, root / "report.json")
    _track(cfg, report, started)
    return report


def _track(cfg: Config, report: dict, started: float) -> None:
    """The mining stage in MLflow (unime_ray/tracking.py): its settings, every report count, the
    reports, the score plot and, once sampled, the inspector page. With an empty data.image_root the
    page is logged without thumbnails (each image named, marked "image not found"): the inspector embeds
    only files under an image root, so that a data file cannot make it embed any file it names, and the
    records' paths are then absolute or relative to the folder each Ray worker happens to run in."""
    if not cfg.tracking.enabled:
        return
    root = Path(cfg.run.output_dir) / "mining"
    params = {k: asdict(getattr(cfg, k)) for k in ("data", "embedder", "judge", "mining")}
    files = [root / "report.json", root / "sample" / "report.json", root / "sample" / "scores.png"]
    with tempfile.TemporaryDirectory() as tmp:
        if "sample" in report:
            from unime_ray.inspector import build_report

            page = Path(tmp) / "inspect.html"
            page.write_text(build_report(cfg.run.output_dir, cfg.data.image_root or None), encoding="utf-8")
            files.append(page)
        log_stage(cfg, "mining", started, params=params, metrics=numbers(report), artifacts=files)


def summary(stage: str, result: dict) -> str:
    """The key counts of a stage's report, for its console line."""
    if stage == "retrieve":
        per = [r for r in result.values() if isinstance(r, dict)]
        counts = {
            "datasets": len(per),
            "candidates": sum(r.get("candidates", 0) for r in per),
            "short_queries": sum(r.get("short_queries", 0) for r in per),
            "nodes": len({r["node"] for r in per if "node" in r}),
        }
    else:
        keys = {
            "ingest": ("queries", "pool"),
            "embed": ("rows", "normalized", "shards_done_before", "parts_done_before"),
            "judge": ("rows", "nan_scores", "shards_done_before", "user_rows_unused"),
            "sample": ("queries_out", "queries_quarantined", "fallback", "nodes"),
        }[stage]
        counts = {k: result[k] for k in keys if k in result}
        tokens = result.get("tokens") or {}
        if tokens.get("calls"):
            counts["prompt_tokens_per_call"] = f"{tokens['prompt_tokens_per_call']:.1f}"
            counts["from_prefix_cache"] = f"{100 * tokens['cache_hit_rate']:.1f}%"
        if stage == "ingest":
            counts["quarantined"] = result["read"]["rows_in"] - result["read"]["rows_out"]
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _rows(files: list[Path]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


def check_not_empty(stage: str, dirs: dict[str, Path]) -> None:
    """A stage that leaves nothing for the next one stops the run, saying which stage and why."""
    why = ""
    if stage == "ingest" and not _rows([dirs["ingest"] / "queries.parquet"]):
        why = f"ingest kept no query: every row was quarantined (see {dirs['ingest'] / 'quarantine.parquet'})"
    elif stage == "embed" and not _rows(sorted((dirs["embed"] / "results").glob("*.parquet"))):
        why = "embed wrote no embedding"
    elif stage == "retrieve" and not _rows(sorted(dirs["retrieve"].glob("*.parquet"))):
        why = (
            "retrieve found no candidate for any query: each dataset's pool holds only the queries' own "
            "positives, or every other candidate is within mining.delta of the query"
        )
    elif stage == "sample" and not _rows([dirs["sample"] / "hard_negatives.parquet"]):
        why = f"sample kept no query: see the reasons in {dirs['sample'] / 'quarantine.parquet'}"
    if why:
        raise PreflightError(why)


def _stale(stage_dir: Path, fingerprint: str) -> bool:
    """An interrupted stage may continue only if it was started with the same settings."""
    mark = stage_dir / "_FINGERPRINT"
    return mark.is_file() and mark.read_text() != fingerprint


def main(argv: list[str] | None = None) -> None:
    import argparse

    from unime_ray.assets import prepare_synthetic
    from unime_ray.config import add_config_args, config_from_args
    from unime_ray.ray_utils import init_ray
    from unime_ray.runlock import command_lock

    p = argparse.ArgumentParser(
        prog="unime-ray mine", description="UniME-V2 hard-negative mining with an MLLM judge"
    )
    add_config_args(p, default="jobs/configs/tiny.yaml")
    p.add_argument("--until", choices=STAGES, default="sample", help="last stage to run (default: all)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    with command_lock(cfg.run.output_dir, "mine"):
        prepare_synthetic(cfg)
        try:
            check_job(cfg, "mine")
            init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
            report = run_mining(cfg, stages=(args.until,))
        except PreflightError as e:
            raise SystemExit(f"[mine] stopped: {e}") from None
    print(json.dumps({s: {k: v for k, v in r.items() if not isinstance(v, dict)} for s, r in report.items()}))
