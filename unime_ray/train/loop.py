"""The training engine shared by the embedder and the reranker: Ray Train workers running DeepSpeed
ZeRO-2 over a LoRA-wrapped backbone, with checkpoints, resume and per-step metrics.

A *task* (`train/embed.py`, `train/rerank.py`) owns the model and turns a micro-batch of mined rows
into a loss; everything else lives here once:

- `deepspeed.initialize` with a client AdamW (no FusedAdam compile on CPU) and a warmup + decay
  schedule; gloo on CPU, nccl on GPU (Ray Train sets up the process group); bf16 on GPU only.
- Gradient accumulation up to `global_batch_size = micro_batch_size x accumulation x workers`.
- Data: the mined rows in a fresh global order every epoch, fixed by (seed, epoch), each rank taking
  its micro-batches of every global batch (`train/rows.py`).
- Every `checkpoint_every` steps all ranks write their DeepSpeed state (frozen base weights excluded),
  rank 0 the peft adapter, and all call `ray.train.report(..., checkpoint=...)`: Ray Train merges the
  ranks' files into one checkpoint and keeps the last `keep_checkpoints`.
- Metrics: every step to `metrics.jsonl` (rank 0); to Ray Train every `report_every` steps and with
  each checkpoint, as each `ray.train.report` is a cross-rank barrier that waits on the controller;
  with tracking on, the same rows to MLflow from rank 0 (unime_ray/tracking.py).
- Resume: a restarted worker group (FailureConfig) or a rerun with the same run name finds the last
  checkpoint with `ray.train.get_checkpoint()` and continues from its step, skipping the micro-batches
  the checkpoint holds; with the optimizer state restored and dropout seeded per micro-batch, it ends
  with the weights of a run that never stopped (bench/chaos.py compares them). Its files are read
  as data only (`load_state_file`: torch's weights_only unpickler), not with DeepSpeed's own
  `torch.load(weights_only=False)`, which would run whatever code a tampered file carries.
- Resume is keyed on every input (`run_training`): only a rerun whose data, model and settings equal
  the run's own, the step budget aside, continues it; anything else starts a fresh run and archives the
  old one, so new hard negatives never return the old model.
- A finished run writes `train_<kind>/_SUCCESS.json` with a fingerprint of all its inputs and its step
  budget; a rerun with the same fingerprint returns that summary without starting a worker (starting
  Ray Train and DeepSpeed only to find nothing left is the slow part of such a rerun).
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import re
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import torch

from unime_ray.config import Config, LoraConfig, ModelConfig, TrainConfig, config_from_dict
from unime_ray.io import digest, file_sha256, weight_stamps, write_json
from unime_ray.keyed import key_int
from unime_ray.models.backbone import load_model
from unime_ray.record import changed_keys, record_stage
from unime_ray.tracking import end_stage, metric_name, start_stage, store_uri, worker_logger
from unime_ray.train.buildlock import clear_stale_build_locks
from unime_ray.train.export import save_model_folder
from unime_ray.train.rows import TrainRows, read_rows

STATE_TAG = "state"
SECTIONS = {"embed": "train", "rerank": "reranker"}  # training kind -> its config section
# The classes DeepSpeed pickles into a ZeRO-2 checkpoint besides tensors and plain containers (found by
# loading fp32 and bf16 checkpoints of DeepSpeed 0.19 with weights_only=True); each is rebuilt from
# plain fields, without running code.
CHECKPOINT_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class Task(Protocol):
    model: torch.nn.Module

    def loss(self, rows: list[dict], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """A micro-batch of mined rows -> (loss, metrics); `epoch` = the pass over the data the batch
        belongs to, for tasks that redraw per pass."""
        ...

    def monitor(self, samples: dict[str, list[dict]]) -> dict[str, float]:
        """Figures on fixed samples of rows ({split: rows}), logged at step 0 and every checkpoint; only
        called when the driver gave samples (`monitor_samples`)."""
        ...


# The language side of both backbones (Qwen2-VL and LLaVA-OV as transformers names them): what trains
# without LoRA. The vision tower, its merger / projector and LLaVA's image_newline stay frozen.
LANGUAGE_PARAMS = ("model.language_model.", "lm_head.")


def keep_batch_norm_frozen(model: torch.nn.Module) -> None:
    """BatchNorm layers (FastVLM's EfficientNet tower) back in eval mode after `model.train()`: a frozen
    tower must normalise with its pretrained running statistics. In train mode BatchNorm would use each
    micro-batch's own statistics (a different function of the image on every batch) and overwrite the
    pretrained ones. Towers without BatchNorm (SigLIP, Qwen2-VL's ViT) are unchanged."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def lora_model(model_cfg: ModelConfig, lora: LoraConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """Backbone with LoRA on the LANGUAGE model's projections only (the vision towers have modules of
    the same names, e.g. SigLIP's q_proj, which the paper's recipe leaves frozen). With `lora.enabled`
    off, the language model itself trains and the vision side (tower and projector) stays frozen."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    model = load_model(model_cfg.path, model_cfg.dtype, model_cfg.adapter)
    model.train()
    keep_batch_norm_frozen(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora.enabled:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(LANGUAGE_PARAMS)
        return model
    targets = "|".join(lora.target_modules)
    peft_cfg = PeftLora(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        target_modules=rf".*language_model.*\.({targets})$",
    )
    return get_peft_model(model, peft_cfg)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then linear or cosine decay to 0 at `cfg.steps`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def accumulation_steps(cfg: TrainConfig) -> int:
    per_step = cfg.micro_batch_size * cfg.num_workers
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of micro_batch_size x num_workers "
            f"= {cfg.micro_batch_size} x {cfg.num_workers}"
        )
    return cfg.global_batch_size // per_step


def deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": cfg.use_gpu},
        "zero_allow_untested_optimizer": True,  # our client AdamW: no fused-op compile on CPU
        "bf16": {"enabled": cfg.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def weights_dir(tcfg: TrainConfig) -> str:
    """A checkpoint's loadable weights: a peft adapter, or (LoRA off) a whole model folder."""
    return "adapter" if tcfg.lora.enabled else "model"


def load_state_file(path: str, map_location: Any = None) -> Any:
    """One file of a DeepSpeed checkpoint, read with `torch.load(weights_only=True)`: tensors, plain
    containers and the CHECKPOINT_CLASSES only, so a tampered checkpoint cannot run code when a run
    resumes (DeepSpeed's own loader passes weights_only=False, which unpickles anything). Raises
    ValueError naming the file and the first other class it holds."""
    allowed = [
        getattr(importlib.import_module(m), n)
        for m, _, n in (name.rpartition(".") for name in CHECKPOINT_CLASSES)
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ValueError(
            f"{path}: holds {found[1] if found else 'a Python object'}, which resume does not unpickle "
            "(only tensors, plain data and train/loop.py's CHECKPOINT_CLASSES). A checkpoint from another "
            "DeepSpeed version may: add the class there once you have checked it holds plain data only"
        ) from None


def _save(engine, tmp: Path, step: int, rank: int, tcfg: TrainConfig) -> None:
    engine.save_checkpoint(str(tmp), tag=STATE_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        weights = tmp / weights_dir(tcfg)
        if tcfg.lora.enabled:
            engine.module.save_pretrained(weights)
        else:
            save_model_folder(engine.module, tcfg.model.path, weights)
        (tmp / "progress.json").write_text(json.dumps({"step": step}))


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from unime_ray.train.embed import EmbedTask
    from unime_ray.train.rerank import RerankTask

    cfg: Config = config_from_dict(Config, config["cfg"])
    kind = config["task"]
    tcfg = getattr(cfg, SECTIONS[kind])
    torch.manual_seed(cfg.run.seed)  # LoRA's initial weights: the same in every run of the seed
    task: Task = {"embed": EmbedTask, "rerank": RerankTask}[kind](cfg)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    for lock in clear_stale_build_locks():  # a worker killed while loading an op would hang us forever
        print(f"[train-{kind}] removed a stale build lock no process holds: {lock}", flush=True)
    params = [p for p in task.model.parameters() if p.requires_grad]
    engine, scheduler = _engine(task, params, tcfg)
    step = resumed_from = _resume(engine, kind)  # 0, or a checkpoint's step after a restart or a rerun
    metrics_file = Path(config["metrics_path"])
    samples = config.get("monitor") or {}  # rows whose ranking rank 0 checks (train/monitor.py)
    check = (lambda: task.monitor(samples)) if samples and rank == 0 else dict
    mlflow = worker_logger(config.get("tracking"))  # rank 0's MLflow, None with tracking off
    if step == 0 and rank == 0 and samples:  # the untrained model's figures, as step 0
        _append(metrics_file, {"step": 0, **check()}, mlflow)
    rows = TrainRows(config["rows"], config["rows_source"])
    per_epoch = rows.batches_per_epoch(world, tcfg.micro_batch_size)
    done = step * accumulation_steps(tcfg)  # this rank's micro-batches the checkpoint holds
    sums, micro, start = {}, 0, time.perf_counter()
    while step < tcfg.steps:
        epoch, skip = divmod(done, per_epoch)  # a resumed run continues mid-epoch where it stopped
        for batch in rows.epoch(cfg.run.seed, epoch, world, rank, tcfg.micro_batch_size, skip):
            # dropout draws depend on the micro-batch, not on what this process ran before it
            torch.manual_seed(key_int(f"{cfg.run.seed}:{rank}:{done}"))
            loss, metrics = task.loss(batch, epoch)
            engine.backward(loss)
            engine.step()
            done, micro = done + 1, micro + 1
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
            if engine.global_steps == step:
                continue  # still accumulating
            step = engine.global_steps
            elapsed = time.perf_counter() - start
            report = {k: v / micro for k, v in sums.items()}
            report.update(
                step=step,
                lr=scheduler.get_last_lr()[0],
                samples_per_s=tcfg.global_batch_size / elapsed,
                time=time.time(),  # wall clock: with samples_per_s it shows time spent outside the steps
            )
            checkpoint = step % tcfg.checkpoint_every == 0 or step >= tcfg.steps
            if checkpoint:
                report.update(check())
            if rank == 0:
                _append(metrics_file, report, mlflow)
            if checkpoint:
                with tempfile.TemporaryDirectory() as tmp:
                    _save(engine, Path(tmp), step, rank, tcfg)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            elif step % tcfg.report_every == 0:
                ray.train.report(report)
            sums, micro, start = {}, 0, time.perf_counter()
            if step >= tcfg.steps:
                break
    # ZeRO-2 keeps a full copy of the parameters on every rank: a checksum per rank shows they agree.
    checksum = sum(p.detach().double().sum().item() for p in params)
    final = metrics_file.with_name(f"final_rank{rank}.json")
    summary = {
        "step": step,
        "resumed_from": resumed_from,
        "trainable_param_sum": checksum,
        "peak_mem_mb": peak_mem_mb(),
    }
    final.write_text(json.dumps(summary))


def _engine(task: Task, params: list[torch.nn.Parameter], tcfg: TrainConfig) -> tuple[Any, Any]:
    """DeepSpeed around the task's model with a client AdamW and the warmup + decay schedule; the task
    then forwards through the engine. Returns (engine, its scheduler)."""
    import deepspeed

    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    engine, _, _, scheduler = deepspeed.initialize(
        model=task.model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tcfg)
    )
    task.model = engine  # forward through the engine
    engine.checkpoint_engine.load = load_state_file  # resume reads data only, never runs pickled code
    return engine, scheduler


def _resume(engine, kind: str) -> int:
    """Load Ray Train's latest checkpoint of this run into `engine`, if there is one; its step, else 0."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(d, tag=STATE_TAG, load_module_strict=False)
        step = json.loads((Path(d) / "progress.json").read_text())["step"]
    print(f"[train-{kind}] resumed at step {step}", flush=True)
    return step


def _append(metrics_file: Path, row: dict, mlflow=None) -> None:
    """One step's row to metrics.jsonl and, with tracking on, the same numbers to MLflow at that step
    (the wall-clock `time` aside: MLflow stamps each point itself)."""
    with metrics_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if mlflow is not None:
        mlflow.log_metrics(
            {metric_name(k): v for k, v in row.items() if k not in ("step", "time")}, step=row["step"]
        )


def peak_mem_mb() -> float:
    """This worker's peak memory: CUDA allocations on GPU, the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def monitor_samples(cfg: Config, kind: str, data: str) -> dict[str, list[dict]]:
    """The reranker's ranking check (`reranker.monitor_queries`): {"train": rows it trains on,
    "held_out": rows withheld from training}; nothing for the embedder or with the check off."""
    n = getattr(cfg, SECTIONS[kind]).monitor_queries if kind == "rerank" else 0
    if n <= 0:
        return {}
    from unime_ray.train.monitor import monitor_rows

    train, held_out = monitor_rows(data, n, cfg.run.seed)
    return {"train": train, "held_out": held_out}


# Keys of a training section that a run may change and still resume: the step budget, and what only
# decides how often it reports, checkpoints and retries. Any other change is a new run.
BUDGET_KEYS = ("steps", "checkpoint_every", "report_every", "keep_checkpoints", "max_failures")


def run_training(cfg: Config, kind: str, restart: bool = False) -> dict:
    """Driver: a TorchTrainer over the mined hard negatives; returns a summary with the adapter path.

    Resume is keyed on every input: a rerun continues the run in `train_<kind>/` only when its data
    (by content), model weights, seed and settings are those the run started with, the step budget
    aside (`BUDGET_KEYS`). Otherwise, or with `restart`, the old run's folders move to
    `archive/train_<kind>-<time>/` and a fresh run starts, saying which keys or files changed."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tcfg = getattr(cfg, SECTIONS[kind])
    data = _check_settings(cfg, kind)
    out = Path(cfg.run.output_dir).resolve()
    name = f"train_{kind}"
    inputs = run_inputs(cfg, kind, data)
    record_stage(cfg, out / name)  # what changed is named below, by the inputs that decide a resume
    marker, fingerprint = out / name / "_SUCCESS.json", digest({"inputs": inputs, "steps": tcfg.steps})
    if marker.is_file() and not restart:
        done = json.loads(marker.read_text())
        summary = done["summary"]
        if done["fingerprint"] == fingerprint and Path(summary["checkpoint"]).is_dir():
            print(f"[train-{kind}] done earlier (step {summary['metrics']['step']}), skipped", flush=True)
            return summary  # its MLflow stage was logged and closed when it ran (tracking.end_stage)
    kept_run_id = _start_or_resume(out, name, inputs, restart)
    metrics_path = out / name / "metrics.jsonl"
    samples = monitor_samples(cfg, kind, data)
    held_out = {r["id"] for r in samples.get("held_out", [])}
    # rank 0 logs each step into it (a resumed run continues its nested run); the caller closes it
    run_id = start_stage(cfg, name, resume=kept_run_id)
    _record_run(out, name, inputs, run_id)
    tracking = run_id and {
        "uri": store_uri(cfg),
        "experiment": cfg.tracking.experiment,
        "run_id": run_id,
        "stage": name,
    }
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "cfg": asdict(cfg),
            "task": kind,
            "metrics_path": str(metrics_path),
            "monitor": samples,
            "tracking": tracking,
            "rows": read_rows(data, exclude=held_out),
            "rows_source": data,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(out / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except BaseException:
        end_stage(cfg, run_id, failed=True)
        raise
    summary = {
        "checkpoint": result.checkpoint.path,
        "weights": str(Path(result.checkpoint.path) / weights_dir(tcfg)),  # adapter/, or model/ without LoRA
        "metrics": result.metrics,
        "metrics_path": str(metrics_path),
        "mlflow_run_id": run_id,
    }
    write_json({"fingerprint": fingerprint, "summary": summary}, marker)
    return summary


def _check_settings(cfg: Config, kind: str) -> str:
    """Fail fast on settings that cannot train; returns the path of the training data."""
    tcfg = getattr(cfg, SECTIONS[kind])
    accumulation_steps(tcfg)  # an impossible batch layout raises here
    for name in ("steps", "checkpoint_every", "report_every"):
        if getattr(tcfg, name) < 1:
            raise ValueError(f"{SECTIONS[kind]}.{name} must be at least 1, got {getattr(tcfg, name)}")
    out = Path(cfg.run.output_dir).resolve()
    data = tcfg.data_path or str(out / "mining" / "sample" / "hard_negatives.parquet")
    if not Path(data).exists():
        raise FileNotFoundError(f"train data {data} not found: run the mining job first or set data_path")
    return data


def run_inputs(cfg: Config, kind: str, data: str) -> dict:
    """Everything a run's model depends on but the step budget: its config section, the seed, the image
    root, the data file's content (re-mining into the same path changes it) and the base model's and
    adapter's weight files (rebuilt in place, they change)."""
    tcfg = getattr(cfg, SECTIONS[kind])
    return {
        SECTIONS[kind]: {k: v for k, v in asdict(tcfg).items() if k not in BUDGET_KEYS},
        "run.seed": cfg.run.seed,
        "data.image_root": cfg.data.image_root,
        "data file": {"path": str(Path(data).resolve()), "sha256": file_sha256(data)},
        "model weights": weight_stamps(tcfg.model.path, tcfg.model.adapter),
    }


def _start_or_resume(out: Path, name: str, inputs: dict, restart: bool) -> str | None:
    """Keep the run in `out/<name>` and `out/ray_train/<name>` when it was started with these inputs
    (Ray Train then resumes from its last checkpoint); else move both folders to the archive, saying why.
    The run's inputs are recorded before training starts, so a run killed at any point resumes. Returns
    the MLflow run id the kept run recorded (`_record_run`), for its nested run to continue; None for a
    fresh run."""
    record = out / name / "_RUN.json"
    folders = [f for f in (out / name, out / "ray_train" / name) if f.exists()]
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    old = recorded.get("inputs")
    label = f"[{name.replace('_', '-')}]"
    if folders and (restart or old != inputs):
        if restart:
            why = "--restart"
        elif old is None:
            why = "no record of the settings it was started with"
        else:
            why = "changed: " + ", ".join(changed_keys(old, inputs))
        archive = out / "archive" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
        while archive.exists():  # two fresh runs within a second
            archive = archive.with_name(archive.name + "+")
        archive.mkdir(parents=True)
        for folder in folders:
            folder.rename(archive / ("ray_train" if folder.parent.name == "ray_train" else "run"))
        print(f"{label} a fresh run ({why}); the earlier run moved to {archive}", flush=True)
        recorded = {}
    elif folders:
        print(f"{label} resuming the run in {out / name} (same data and settings)", flush=True)
    _record_run(out, name, inputs, recorded.get("mlflow_run_id"))
    return recorded.get("mlflow_run_id")


def _record_run(out: Path, name: str, inputs: dict, mlflow_run_id: str | None) -> None:
    """`out/<name>/_RUN.json`: the inputs the run started with and the id of its MLflow nested run."""
    write_json({"inputs": inputs, "mlflow_run_id": mlflow_run_id}, out / name / "_RUN.json")
