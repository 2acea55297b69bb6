"""Typed configuration: nested dataclasses loaded from YAML, overridable with dotted keys.

    cfg = load_config("jobs/configs/tiny.yaml", overrides=["mining.beta=0.02", "train.steps=10"])

Every key is checked against the dataclasses: an unknown key or a value of the wrong type is a
`ConfigError` that names the dotted key (and the file), never a silently ignored typo.
Values in overrides are parsed as YAML scalars (`0.02` -> float, `true` -> bool, `[a, b]` -> list).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Exact-search defaults of `engine.index` (mining's retrieve and the Serve index): pool vectors per
# chunk and queries per block bound the score matrix a search holds; lists probed by an IVF index.
SEARCH_CHUNK_SIZE = 262144
SEARCH_QUERY_BLOCK = 16384
IVF_NPROBE = 32


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


@dataclass
class RunConfig:
    output_dir: str = field(default="runs/tiny", metadata={"help": "where every stage writes its outputs"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, shuffling and initialisation"})


@dataclass
class DataConfig:
    train_dir: str = field(
        default="",
        metadata={"help": "folder of MMEB-train style files, one per dataset (<name>.parquet|jsonl)"},
    )
    eval_dir: str = field(default="", metadata={"help": "folder of MMEB-eval style files, one per dataset"})
    image_root: str = field(default="", metadata={"help": "image paths in the records are relative to this"})
    datasets: list[str] = field(
        default_factory=list, metadata={"help": "subset names to use; empty = every file in the folder"}
    )
    synthetic: bool = field(
        default=False,
        metadata={"help": "the paths are the synthetic world and tiny models: build them if missing"},
    )
    check_images: bool = field(
        default=True, metadata={"help": "open every image when reading (quarantines corrupt files up front)"}
    )
    allow_absolute_images: bool = field(
        default=False,
        metadata={
            "help": "accept absolute image paths in the records (default: quarantined as bad_image_path, "
            "like paths that leave data.image_root)"
        },
    )
    max_quarantined_fraction: float = field(
        default=0.5,
        metadata={
            "help": "mining stops after ingest when a dataset loses all, or more than this fraction, of its "
            "rows to quarantine (e.g. a wrong image_root); 1.0 = only when all are lost"
        },
    )


@dataclass
class ModelConfig:
    path: str = field(default="", metadata={"help": "local HF model folder (no hub access is assumed)"})
    adapter: str = field(default="", metadata={"help": "optional peft adapter folder applied on top"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto = bfloat16 on CUDA, float32 on CPU"}
    )
    image_size: int = field(default=336, metadata={"help": "images are resized to image_size x image_size"})
    max_length: int = field(default=1024, metadata={"help": "token limit per record (truncation)"})
    batch_size: int = field(default=16, metadata={"help": "records per forward pass"})


@dataclass
class EmbedderConfig(ModelConfig):
    backend: Literal["model", "precomputed"] = field(
        default="model",
        metadata={"help": "model: embed with `path`; precomputed: read `embeddings_path` (bring your own)"},
    )
    embeddings_path: str = field(
        default="",
        metadata={
            "help": "precomputed embeddings: Parquet with `id` (every query and pool id once) and "
            "`embedding` (list of floats, one dimension); normalized on read"
        },
    )


@dataclass
class JudgeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: Literal["vllm", "transformers", "precomputed"] = field(
        default="vllm", metadata={"help": "vllm (production), transformers (reference), precomputed (a file)"}
    )
    vllm_model_impl: Literal["auto", "vllm", "transformers"] = field(
        default="auto",
        metadata={
            "help": "vLLM modeling backend; 'transformers' where torchvision is absent. Only then, and only "
            "for a model folder carrying the installed unime_ray/models/processing_unime.py (make-tiny "
            "folders), is vLLM let run code from the folder (trust_remote_code); never for others"
        },
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM memory fraction"})
    prefix_caching: bool = field(
        default=True, metadata={"help": "vLLM prefix caching: the ~51 prompts of a query share its KV"}
    )
    block_size: int = field(
        default=0,
        metadata={
            "help": "vLLM KV block size in tokens (0 = vLLM's default; CPU: a multiple of 32); a shared "
            "prefix is reused in whole blocks, so smaller blocks reuse more of short prefixes"
        },
    )
    prompt: Literal["paper", "short"] = field(
        default="paper",
        metadata={
            "help": "the judge's instruction: paper = the official wording; short = a one-line question "
            "(ours); both put the query before the candidate. Compare them with `unime-ray judge-agree`"
        },
    )
    max_candidate_tokens: int = field(
        default=0,
        metadata={
            "help": "cap on a candidate's text, in the judge tokenizer's tokens (the end is cut; its image "
            "is kept); 0 = no cap. The candidate is the part of a call the prefix cache cannot share"
        },
    )
    scores_path: str = field(default="", metadata={"help": "precomputed judge scores (backend=precomputed)"})


@dataclass
class MiningConfig:
    top_n: int = field(
        default=50, metadata={"help": "potential hard negatives retrieved per query (paper: 50)"}
    )
    delta: float = field(
        default=0.98,
        metadata={"help": "drop candidates with cosine >= delta (near duplicates); not given in the paper"},
    )
    beta: float = field(
        default=0.01,
        metadata={"help": "false-negative margin: drop s > s(q, c_t) - beta; paper leaves it open"},
    )
    interval: int = field(default=5, metadata={"help": "cyclical sampling step over score-ranked survivors"})
    min_negatives: int = field(default=10, metadata={"help": "pad by repetition to at least this many"})
    num_negatives: int = field(default=10, metadata={"help": "negatives stored per query (official: 10)"})
    index: Literal["exact", "ivf"] = field(default="exact", metadata={"help": "FAISS index type"})
    chunk_size: int = field(
        default=SEARCH_CHUNK_SIZE,
        metadata={"help": "retrieve: pool vectors per exact-search chunk (bounds memory)"},
    )
    query_block: int = field(
        default=SEARCH_QUERY_BLOCK, metadata={"help": "retrieve: queries searched at once"}
    )
    ivf_nprobe: int = field(
        default=IVF_NPROBE, metadata={"help": "retrieve: inverted lists probed per query (ivf)"}
    )
    faiss_gpu: bool | None = field(
        default=None, metadata={"help": "retrieve: FAISS on GPU; null = when FAISS sees a GPU"}
    )
    embed_shard_rows: int = field(
        default=4096, metadata={"help": "items per embedding shard (the unit of resume for embedding)"}
    )
    judge_shard_queries: int = field(
        default=256, metadata={"help": "queries per judge shard (x (top_n + 1) calls; the unit of resume)"}
    )
    num_actors: int = field(
        default=1, metadata={"help": "embedding / judge actors (one GPU each on clusters)"}
    )
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per embedding / judge actor"})


@dataclass
class LoraConfig:
    enabled: bool = field(
        default=True,
        metadata={
            "help": "false = no adapter: every language-model weight trains (vision tower frozen). For "
            "random-weight test models, whose random layers low-rank updates barely reshape"
        },
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank (paper: 16 embedder, 128 reranker)"})
    alpha: int = field(default=64, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    use_dora: bool = field(default=True, metadata={"help": "DoRA, as the official embedder training"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names LoRA attaches to (language model only)"},
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: Literal["jeffreys", "js", "infonce"] = field(
        default="jeffreys", metadata={"help": "paper eq. 4 as coded (symmetric KL), true JS, or InfoNCE"}
    )
    tau: float = field(default=0.02, metadata={"help": "temperature on both similarity and judge scores"})
    num_negatives: int = field(default=8, metadata={"help": "hard negatives per query used in training"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warmup steps"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    global_batch_size: int = field(default=1024, metadata={"help": "queries per optimizer step, all workers"})
    micro_batch_size: int = field(default=8, metadata={"help": "queries per forward on one worker"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "trade compute for memory"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, nccl; else gloo on CPU"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    report_every: int = field(
        default=10,
        metadata={
            "help": "steps between metric reports to Ray Train (each is a cross-rank barrier that waits for "
            "the controller: docs/benchmarks.md); metrics.jsonl still gets every step"
        },
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept"})
    schedule: Literal["linear", "cosine"] = field(
        default="linear", metadata={"help": "decay after warmup (official: linear embedder, cosine reranker)"}
    )
    data_path: str = field(
        default="", metadata={"help": "hard-negative Parquet; empty = this run's mining/sample output"}
    )
    cpus_per_worker: float = field(
        default=1.0, metadata={"help": "CPUs reserved per training worker (Ray gives it that many threads)"}
    )
    max_failures: int = field(
        default=3, metadata={"help": "worker failures survived by restarting from the last checkpoint"}
    )


@dataclass
class RerankerConfig(TrainConfig):
    """The reranker's training section: a `TrainConfig` and what only the reranker's task reads."""

    list_size: int = field(
        default=9,
        metadata={"help": "negatives in the listwise prompt (9 + the positive = eval's top 10)"},
    )
    point_negatives: int = field(
        default=4,
        metadata={
            "help": "distinct negatives per query answered 'No' in the pointwise term, highest "
            "judge score first (paper: 1, the hardest)"
        },
    )
    rank_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the ranking term, a softmax of logit(Yes) - logit(No) over the "
            "positive and the pointwise negatives (0: the paper's loss alone)"
        },
    )
    monitor_queries: int = field(
        default=16,
        metadata={
            "help": "queries of the mined file on which pointwise and listwise P@1 is logged at step 0 "
            "and every checkpoint, as many again withheld from training for held-out figures; 0 = off"
        },
    )


@dataclass
class RayConfig:
    address: str = field(default="", metadata={"help": "Ray cluster address; empty = start a local Ray"})
    verbose: bool = field(
        default=False,
        metadata={
            "help": "show Ray's own logs (workers, Ray Data plans, Serve, Train) on the console; off, they "
            "stay in Ray's session log files and only our stage lines and progress bars show (--verbose)"
        },
    )


@dataclass
class EvalConfig:
    output_dir: str = field(default="", metadata={"help": "results folder; empty = <run.output_dir>/eval"})
    cache_dir: str = field(
        default="", metadata={"help": "embedding + rerank cache; empty = <run.output_dir>/cache"}
    )
    suites: list[Literal["mmeb", "retrieval", "compositional"]] = field(
        default_factory=list, metadata={"help": "suites to run; empty = every suite whose data is given"}
    )
    retrieval: list[str] = field(
        default_factory=list,
        metadata={"help": "image-caption files (Flickr30K / COCO Karpathy json, or image + captions jsonl)"},
    )
    compositional: list[str] = field(
        default_factory=list, metadata={"help": "SugarCrepe-style files, one per subset (replace_att.json)"}
    )
    image_root: str = field(
        default="",
        metadata={"help": "images of the retrieval / compositional files; empty = data.image_root"},
    )
    split: str = field(default="test", metadata={"help": "split kept from a Karpathy file"})
    max_captions: int = field(default=5, metadata={"help": "captions kept per image (official: 5); 0 = all"})
    image_prompt: str = field(
        default="<|image_1|> Find an image caption describing the given image.",
        metadata={"help": "text embedded with each image of retrieval / compositional (official wording)"},
    )
    caption_prompt: str = field(
        default="", metadata={"help": "text put before each caption (official: none)"}
    )
    meta_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "DATASET=META_TASK for eval sets outside MMEB's 36 (also read from world.json)"},
    )
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "retrieval Recall@k"})
    top_k: int = field(default=10, metadata={"help": "embedding top-K handed to the reranker (paper: 10)"})
    rerank: list[Literal["listwise", "pointwise"]] = field(
        default_factory=list,
        metadata={"help": "reranking modes run with reranker.model (--reranker turns on both); empty = none"},
    )
    fusion_alpha: float = field(
        default=1.0, metadata={"help": "pointwise: alpha * p_yes + (1 - alpha) * cosine"}
    )
    num_actors: int = field(default=1, metadata={"help": "embedding / reranking actors (one GPU each)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per embedding / reranking actor"})
    shard_rows: int = field(
        default=4096, metadata={"help": "items per cached embedding shard (the unit of resume)"}
    )


@dataclass
class IndexConfig:
    dir: str = field(default="", metadata={"help": "index folder; empty = <run.output_dir>/index"})
    type: Literal["exact", "ivf", "hnsw"] = field(
        default="exact", metadata={"help": "FAISS index: exact, or ivf / hnsw (approximate, large corpora)"}
    )
    items: Literal["images", "texts", "both"] = field(
        default="both", metadata={"help": "image + captions corpora: index the images, the captions, or both"}
    )
    image_prompt: str = field(
        default="<|image_1|>\nRepresent the given image.",
        metadata={"help": "text embedded with each image of an image + captions corpus (MMEB's wording)"},
    )
    ivf_nprobe: int = field(default=IVF_NPROBE, metadata={"help": "ivf: inverted lists probed per query"})
    hnsw_m: int = field(default=32, metadata={"help": "hnsw: graph neighbours per node (build time)"})
    hnsw_ef_construction: int = field(default=200, metadata={"help": "hnsw: build-time search depth"})
    hnsw_ef_search: int = field(default=128, metadata={"help": "hnsw: query-time search depth"})
    faiss_gpu: bool | None = field(
        default=None, metadata={"help": "exact / ivf search on GPU; null = when FAISS sees a GPU"}
    )
    num_actors: int = field(default=1, metadata={"help": "embedding actors while building"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per embedding actor while building"})


@dataclass
class DeploymentConfig:
    min_replicas: int = field(default=1, metadata={"help": "replicas at least"})
    max_replicas: int = field(
        default=1, metadata={"help": "replicas at most; above min_replicas Serve autoscales in between"}
    )
    target_ongoing_requests: float = field(
        default=2.0, metadata={"help": "autoscaling target of queued + running requests per replica"}
    )
    max_ongoing_requests: int | None = field(
        default=None,
        metadata={
            "help": "requests a replica takes at once (bounds the batch it can form); null = the "
            "deployment's default (ingress 256, embedder and index 64, reranker 8)"
        },
    )
    num_cpus: float | None = field(
        default=None,
        metadata={"help": "CPUs per replica; null = the deployment's default (embedder, reranker 1)"},
    )
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per replica"})
    max_queued_requests: int | None = field(
        default=None,
        metadata={
            "help": "requests each caller (the HTTP proxy for the ingress, the Ingress for the others) "
            "queues while every replica holds max_ongoing_requests; beyond that Serve answers 503 with "
            "Retry-After at once; -1 = no limit; null = the deployment's default (ingress 128, embedder "
            "64, reranker 16, index no limit)"
        },
    )
    retry_after_s: float = field(
        default=1.0, metadata={"help": "Retry-After (seconds, rounded up) of the 503 of a full queue"}
    )
    upscale_delay_s: float | None = field(
        default=None,
        metadata={"help": "autoscaling: above target for this long before scaling up; null = Serve's 30"},
    )
    downscale_delay_s: float | None = field(
        default=None,
        metadata={"help": "autoscaling: below target for this long before scaling down; null = Serve's 600"},
    )
    look_back_period_s: float | None = field(
        default=None,
        metadata={"help": "autoscaling: window the load is averaged over; null = Serve's 30"},
    )
    metrics_interval_s: float | None = field(
        default=None,
        metadata={
            "help": "autoscaling: how often callers and replicas report load to Serve's controller; null = "
            "Serve's 10 (Serve 2.60 marks this field deprecated, to become an environment variable, but "
            "still reads it)"
        },
    )
    health_check_period_s: float = field(
        default=2.0,
        metadata={
            "help": "how often Serve's controller checks each replica (Serve's default: 10), so how soon a "
            "dead one is found and replaced"
        },
    )


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP address (unime-ray serve)"})
    port: int = field(default=8000, metadata={"help": "HTTP port (unime-ray serve)"})
    api_key_env: str = field(
        default="", metadata={"help": "environment variable holding the API key (X-API-Key); empty = none"}
    )
    allow_public_without_key: bool = field(
        default=False,
        metadata={
            "help": "serve without an API key on a host other machines reach (not loopback); without "
            "this, such a start is refused"
        },
    )
    allowed_hosts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Host header names the app answers (others get 400; stops DNS rebinding); "
            "'*.example.org' matches subdomains; empty = the loopback names when serve.host is loopback, "
            "serve.host itself when it is one address, any name when it is 0.0.0.0 or ::"
        },
    )
    max_request_bytes: int = field(default=8 << 20, metadata={"help": "largest request body"})
    max_image_bytes: int = field(default=4 << 20, metadata={"help": "largest decoded image"})
    max_image_pixels: int = field(
        default=4096 * 3072, metadata={"help": "largest image width x height (a 12 MP photo fits)"}
    )
    max_request_pixels: int = field(
        default=1 << 25,
        metadata={
            "help": "largest sum of width x height over the images of one request, checked from their "
            "headers before any is decoded"
        },
    )
    max_text_chars: int = field(default=4096, metadata={"help": "longest query text or instruction"})
    max_embed_inputs: int = field(default=16, metadata={"help": "inputs per /v1/embed request"})
    default_top_k: int = field(default=10, metadata={"help": "results when the request names no top_k"})
    max_top_k: int = field(default=100, metadata={"help": "largest top_k accepted"})
    rerank: Literal["auto", "none", "listwise", "pointwise"] = field(
        default="auto",
        metadata={
            "help": "reranking when a request names none; auto = listwise when a reranker is deployed "
            "(the paper's pipeline), else none"
        },
    )
    rerank_top: int = field(
        default=10, metadata={"help": "embedding top-K handed to the reranker (paper: 10)"}
    )
    rerank_alpha: float = field(
        default=1.0, metadata={"help": "pointwise: alpha * p_yes + (1 - alpha) * cosine"}
    )
    batching: bool = field(default=True, metadata={"help": "batch concurrent requests in the embedder"})
    max_batch_size: int = field(default=16, metadata={"help": "embedder batch size at most"})
    batch_wait_s: float = field(
        default=0.1,
        metadata={
            "help": "longest wait of a batch for more requests after its first; the wait follows the "
            "duration of the last forward pass, up to this"
        },
    )
    body_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "longest time a request body may take to arrive after its headers; a slower client "
            "gets 408 and its request slot back"
        },
    )
    inspect_run: str = field(
        default="",
        metadata={
            "help": "a finished mining run (its run.output_dir) whose inspector page is served at /inspect; "
            "its images are read under data.image_root; empty = no /inspect"
        },
    )
    ingress: DeploymentConfig = field(default_factory=DeploymentConfig)
    embedder: DeploymentConfig = field(default_factory=DeploymentConfig)
    index: DeploymentConfig = field(default_factory=DeploymentConfig)
    reranker: DeploymentConfig = field(default_factory=DeploymentConfig)


@dataclass
class TrackingConfig:
    enabled: bool = field(
        default=True,
        metadata={"help": "log every stage to MLflow: one parent run per run folder, a nested run per stage"},
    )
    uri: str = field(
        default="",
        metadata={"help": "MLflow tracking URI (a server, a database); empty = <run.output_dir>/mlruns"},
    )
    experiment: str = field(default="unime_ray", metadata={"help": "MLflow experiment the runs go to"})


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `5e-3` (no dot) is a string; users write it for learning rates.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got str {value!r}") from None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            dotted = {f"{prefix}.{n}" if prefix else n for n in names}
            close = difflib.get_close_matches(where, sorted(dotted), n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(sorted(dotted))}"
            raise ConfigError(f"unknown key {where!r}; {hint}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`'mining.beta=0.02'` -> `('mining.beta', 0.02)`; the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Config:
    """Load `path` (YAML; may be None for defaults), or else start from `base` (a config as a dict, e.g.
    one a run recorded), and apply `section.key=value` overrides.

    The overrides are checked on their own first, so a bad one is blamed on `--set`, not on the file."""
    tree: dict = copy.deepcopy(base) if base is not None and path is None else {}
    checked: dict = {}
    for item in overrides or []:
        _set_dotted(checked, *parse_override(item))
    try:
        _build(Config, checked, "")
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None
    if path is not None:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return absolute_paths(_build(Config, tree, ""))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


PATH_FIELDS = {
    "output_dir",
    "train_dir",
    "eval_dir",
    "image_root",
    "path",
    "adapter",
    "scores_path",
    "embeddings_path",
    "data_path",
}


def absolute_paths(cfg: Any) -> Any:
    """Relative paths are relative to where the job was started: made absolute once, here, because Ray
    workers (Ray Train's in particular) run in other working directories."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            absolute_paths(value)
        elif f.name in PATH_FIELDS and isinstance(value, str) and value and "://" not in value:
            setattr(cfg, f.name, os.path.abspath(value))
    return cfg


def output_settings(model: ModelConfig) -> dict:
    """Every field of `model` (an EmbedderConfig too) but `batch_size`, which changes speed, not
    outputs: what caches and stage fingerprints key a model's results on."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k != "batch_size"}


def model_dict(model: ModelConfig) -> dict:
    """The ModelConfig fields of `model` (an EmbedderConfig too) as a dict, for actors that load it."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelConfig)}


def config_from_dict(cls: type, values: dict) -> Any:
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output, e.g. inside a Ray actor."""
    return _build(cls, values, cls.__name__)


def add_config_args(parser, default: str | None = None, run: bool = False) -> None:
    """`--config FILE` and repeatable `--set section.key=value`, shared by every job and subcommand;
    with `run`, also `--run RUN_DIR` (a finished run's index, embedder and reranker: unime_ray/runs.py),
    whose recorded config (its run.json) replaces `default` when no --config is given."""
    parser.add_argument(
        "--config",
        default=None if run else default,
        help="YAML config (see jobs/configs/)"
        + (f"; default {default}, or the run's own with --run" if run else ""),
    )
    parser.set_defaults(default_config=default)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set mining.beta=0.02 (repeatable)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs on the console (= --set ray.verbose=true)"
    )
    if run:
        parser.add_argument(
            "--run",
            metavar="RUN_DIR",
            help="a finished run folder, e.g. runs/tiny after `unime-ray demo`: its index, and the embedder "
            "and reranker it trained (train_*/_SUCCESS.json); --set applies after it",
        )


def config_from_args(args, recorded_in: str | Path | None = None) -> Config:
    """The config of a command's `--config` / `--set` / `--verbose`; a bad key or value stops the command
    with one line naming it (the closest valid keys for a misspelt one), not a traceback.

    Without --config, the config recorded in the run folder `--run` (or `recorded_in`) names is the
    base (unime_ray/record.py), else the command's default file; `--run`'s final weights and then --set
    apply on top."""
    from unime_ray.record import RECORD, recorded_config
    from unime_ray.runs import run_overrides

    verbose = ["ray.verbose=true"] if getattr(args, "verbose", False) else []
    run_dir = getattr(args, "run", None) or recorded_in
    path, base = args.config, None
    try:
        if path is None and run_dir:
            base = recorded_config(run_dir)
        if path is None and base is None:
            path = getattr(args, "default_config", None)
        run = run_overrides(args.run) if getattr(args, "run", None) else []
        return load_config(path, [*run, *args.overrides, *verbose], base=base)
    except ConfigError as e:
        where = f"{Path(run_dir) / RECORD}: " if base is not None and not str(e).startswith("--set") else ""
        raise SystemExit(f"error: {where}{e}") from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """The configuration reference: (dotted key, type, value in `cfg`, help) for every leaf field."""
    hints = typing.get_type_hints(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            tp = hints[f.name]
            name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            rows.append((f"{prefix}{f.name}", name, value, f.metadata.get("help", "")))
    return rows


def main(argv: list[str] | None = None) -> None:
    """`unime-ray config`: every key of a config with its type, value and help (the reference)."""
    import argparse

    p = argparse.ArgumentParser(prog="unime-ray config", description=main.__doc__.split(": ", 1)[1])
    add_config_args(p)
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print Markdown tables instead (without --config / --set: the generated part of "
        "docs/configuration.md)",
    )
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.markdown:
        # Without --config / --set: the defaults as written in the code (load_config would make the
        # default paths absolute, i.e. specific to this machine).
        from unime_ray.docsgen import reference_markdown

        print(reference_markdown(cfg if args.config or args.overrides else None), end="")
        return
    for key, tp, value, text in describe(cfg):
        print(f"{key} = {value!r}  [{tp}]  {text}")
