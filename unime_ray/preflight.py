"""Fail-fast checks before a job starts Ray: each problem stops the job with ONE message that names the
config key to fix, instead of a stage failing minutes later on an empty input.

    check_job(cfg, "mine")      # data folder, model folders, output folder, GPU settings

and, once ingest has read the data, `check_quarantine(report, cfg)` stops a run whose datasets lost all,
or more than `data.max_quarantined_fraction`, of their rows (a wrong `data.image_root` quarantines every
image row as `missing_image`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.config import Config
from unime_ray.data.mmeb import DATA_SUFFIXES, load_records

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class PreflightError(ValueError):
    """A job cannot start: the message names the config key to fix."""


def check_data_folder(folder: str, key: str) -> None:
    if not folder:
        raise PreflightError(f"{key} is not set: point it at a folder of MMEB-style files")
    path = Path(folder)
    if not path.is_dir():
        raise PreflightError(f"{key}: no folder {folder}")
    if not any(p.suffix in DATA_SUFFIXES and p.is_file() for p in path.iterdir()):
        raise PreflightError(f"{key}: {folder} holds no data files ({', '.join(DATA_SUFFIXES)})")


def check_model_folder(folder: str, key: str) -> None:
    """A Hugging Face model folder: its config, weights and tokenizer, as `from_pretrained` needs."""
    path = Path(folder)
    if not folder or not path.is_dir():
        raise PreflightError(f"{key}: no model folder {folder!r} (a local Hugging Face folder; no hub)")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(pattern)) for pattern in WEIGHTS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in TOKENIZER):
        missing.append("a tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise PreflightError(f"{key}: {folder} lacks {', '.join(missing)}")


def check_output(folder: str, key: str = "run.output_dir") -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PreflightError(f"{key}: cannot write to {folder} ({e.strerror or e})") from None


def _has_local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_gpus(cfg: Config, job: str) -> None:
    """GPU settings on a machine without a GPU. Only for a local Ray: a cluster's GPU nodes may not
    have started yet (an autoscaler adds them when the job asks), so there the request stands."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS") or _has_local_gpu():
        return
    asked = {
        "mine": [
            ("mining.gpus_per_actor", cfg.mining.gpus_per_actor > 0),
            ("mining.faiss_gpu", cfg.mining.faiss_gpu),
        ],
        "train_embed": [("train.use_gpu", cfg.train.use_gpu)],
        "train_rerank": [("reranker.use_gpu", cfg.reranker.use_gpu)],
        "eval": [("eval.gpus_per_actor", cfg.eval.gpus_per_actor > 0)],
    }.get(job, [])
    for key, on in asked:
        if on:
            raise PreflightError(f"{key} asks for a GPU, but this machine has none and no Ray cluster is set")


def check_job(cfg: Config, job: str) -> None:
    """The checks that need no Ray and no data read, for `job` in mine | train_embed | train_rerank."""
    check_output(cfg.run.output_dir)
    check_gpus(cfg, job)
    if job == "mine":
        check_data_folder(cfg.data.train_dir, "data.train_dir")
        if cfg.embedder.backend == "model":
            check_model_folder(cfg.embedder.path, "embedder.path")
        elif not Path(cfg.embedder.embeddings_path).is_file():
            raise PreflightError(f"embedder.embeddings_path: no file {cfg.embedder.embeddings_path!r}")
        if cfg.judge.backend != "precomputed":
            check_model_folder(cfg.judge.model.path, "judge.model.path")
        if cfg.judge.backend == "vllm":
            from unime_ray.models.judge import check_vllm_backbone

            try:
                check_vllm_backbone(cfg.judge.model.path)
            except ValueError as e:
                raise PreflightError(str(e)) from None
    elif job in ("train_embed", "train_rerank"):
        section = "train" if job == "train_embed" else "reranker"
        check_model_folder(getattr(cfg, section).model.path, f"{section}.model.path")


def check_quarantine(ingest_dir: Path, report: dict, cfg: Config) -> None:
    """Stop when a dataset lost all, or more than `data.max_quarantined_fraction`, of its rows: the
    message gives the counts by reason and one example path as it was resolved."""
    limit = cfg.data.max_quarantined_fraction
    quarantine = pq.read_table(ingest_dir / "quarantine.parquet")
    if not quarantine.num_rows:
        return
    kept = {name: d["queries"] for name, d in report["datasets"].items()}
    source = pc.replace_substring_regex(quarantine["source"], r"^.*/([^/]*)\.[^.]*$", r"\1")
    for name, n_kept in kept.items():
        lost = quarantine.filter(pc.equal(source, name))
        total = n_kept + lost.num_rows
        if not lost.num_rows or (n_kept and lost.num_rows <= limit * total):
            continue
        reasons = {c["values"]: c["counts"] for c in pc.value_counts(lost["reason"]).to_pylist()}
        first = lost.slice(0, 1).to_pylist()[0]
        example = f"row {first['row']} of {first['source']}, field {first['field']}"
        if first["field"].endswith("image_path"):
            _, record = load_records(Path(first["source"]))[first["row"]]
            example += f": {Path(cfg.data.image_root) / str(record.get(first['field']))}"
        raise PreflightError(
            f"dataset {name!r}: {lost.num_rows} of {total} rows quarantined {reasons}, more than "
            f"data.max_quarantined_fraction = {limit}; e.g. {example}. Fix the data or data.image_root, or "
            "raise data.max_quarantined_fraction"
        )
