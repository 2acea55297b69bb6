"""Experiment tracking with MLflow (`tracking` config section): one parent MLflow run per run folder
(`run.output_dir`), one nested run per stage that finishes in it.

- mining: the mining config as parameters, the counts of every stage's report as metrics, the sample
  report, the score plot and the inspector page as artifacts;
- training (embedder, reranker): rank 0 logs every step's loss, P@1 / ranking figures, learning rate and
  throughput from inside Ray Train through Ray's MLflow integration (`setup_mlflow`), into the nested run
  the driver opened; the driver then adds the learning-curve plot and the checkpoint path. A resumed
  training (killed, then rerun; or rerun with more steps) continues the nested run it opened first, whose
  id its `_RUN.json` records, so the run holds every step of metrics.jsonl;
- eval: every number of results.json (each dataset's score, the averages), the tables and plots;
- build-index: its counts.

The store is a local MLflow file store under the run folder unless `tracking.uri` names another (a
tracking server, a database): nothing leaves the machine by default, MLflow's usage telemetry is off,
and MLflow's log lines stay off the console. Tracking never changes what a stage computes or writes;
a stage that fails is not logged (training's nested run is then marked FAILED).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TAG_RUN_DIR = "unime.run_dir"  # on the parent run: the run folder it stands for
TAG_STAGE = "unime.stage"  # on a nested run: the stage
PARENT = "mlflow.parentRunId"  # MLflow's own tag that nests a run under another
BATCH = 100  # MLflow's limit of parameters per log_batch call


def _quiet() -> None:
    """No telemetry, no INFO lines on the console; the local file store allowed (MLflow 3 refuses it
    unless told otherwise, recommending a database, which MLflow's lighter `mlflow-skinny` cannot open)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def store_uri(cfg: Any) -> str:
    """`tracking.uri`, or the file store `<run.output_dir>/mlruns`."""
    return cfg.tracking.uri or (Path(cfg.run.output_dir).resolve() / "mlruns").as_uri()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out.update(flatten(v, f"{name}.") if isinstance(v, dict) else {name: v})
    return out


def metric_name(key: str) -> str:
    """A metric key MLflow accepts: `@` spelt `_at_` (`p@1` -> `p_at_1`), other characters outside
    MLflow's set (alphanumerics, `_ - . : /` and space) replaced by `_`."""
    return re.sub(r"[^\w\-.:/ ]", "_", key.replace("@", "_at_"))


def numbers(tree: dict) -> dict[str, float]:
    """The numeric leaves of a nested dict (bools and None left out), as MLflow metrics."""
    return {
        metric_name(k): float(v)
        for k, v in flatten(tree).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v
    }


def _client(cfg: Any):
    _quiet()
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise RuntimeError(
            "tracking.enabled is true but MLflow is not installed: `pip install mlflow-skinny`, "
            "or --set tracking.enabled=false"
        ) from None
    return MlflowClient(store_uri(cfg))


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def _parent(client, experiment: str, run_dir: Path) -> str:
    """The parent run of the run folder: found by its tag, else created."""
    key = str(run_dir.resolve())
    runs = client.search_runs([experiment], filter_string=f"tags.`{TAG_RUN_DIR}` = '{key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    return client.create_run(experiment, run_name=run_dir.name, tags={TAG_RUN_DIR: key}).info.run_id


def start_stage(cfg: Any, stage: str, start: float | None = None, resume: str | None = None) -> str | None:
    """Open the nested run of `stage` under the run folder's parent run; its id, None with tracking off.
    `start` (time.time()) back-dates the run to when the stage began. `resume` is the id of the nested
    run an earlier, interrupted attempt of the stage opened (the stage records it): when this store still
    holds it, it is reopened and returned, so a resumed stage stays one run holding the metrics of every
    part, as its own files do; otherwise a new run is opened."""
    if not cfg.tracking.enabled:
        return None
    client = _client(cfg)
    if resume and _reopen(client, resume, stage):
        return resume
    experiment = _experiment(client, cfg.tracking.experiment)
    parent = _parent(client, experiment, Path(cfg.run.output_dir))
    run = client.create_run(
        experiment,
        run_name=stage,
        start_time=int(1000 * (start or time.time())),
        tags={PARENT: parent, TAG_STAGE: stage},
    )
    return run.info.run_id


def _reopen(client, run_id: str, stage: str) -> bool:
    """Mark the stage's earlier run RUNNING again (a killed attempt left it RUNNING or FAILED, a finished
    one FINISHED); False when the store has no live run of that id for `stage` (tracking.uri changed, the
    run was deleted)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.lifecycle_stage != "active" or run.data.tags.get(TAG_STAGE) != stage:
        return False
    client.update_run(run_id, status="RUNNING")
    return True


def end_stage(
    cfg: Any,
    run_id: str | None,
    *,
    params: dict | None = None,
    metrics: dict[str, float] | None = None,
    artifacts: Iterable[str | Path] = (),
    failed: bool = False,
) -> None:
    """Log `params` (flattened), `metrics` and the existing `artifacts` files into the stage's run and
    close it. No-op when `run_id` is None or tracking is off, and for a run closed before: a finished
    training found again and skipped hands back the run its stage logged then, which stays as it was.

    MLflow's parameters cannot change: a continued run (`start_stage(resume=...)`) that logged them
    before keeps their first values, and each value that differs now (a larger step budget, a later
    checkpoint) is set as the tag `latest.<key>`."""
    if run_id is None or not cfg.tracking.enabled:
        return
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException:  # not in this store (tracking.uri changed since): nothing to close here
        return
    if run.info.status != "RUNNING":
        return
    now = int(time.time() * 1000)
    flat = {k: str(v)[:6000] for k, v in flatten(params or {}).items()}
    logged = run.data.params
    new = [Param(k, v) for k, v in flat.items() if k not in logged]
    for i in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[i : i + BATCH])
    for k, v in flat.items():
        if k in logged and logged[k] != v:
            client.set_tag(run_id, f"latest.{k}", v)
    points = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])
    for path in artifacts:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def log_stage(cfg: Any, stage: str, start: float, **logged: Any) -> None:
    """A stage that finished: its nested run opened at `start` and closed with what `end_stage` logs."""
    end_stage(cfg, start_stage(cfg, stage, start), **logged)


def worker_logger(tracking: dict | None):
    """Inside a Ray Train worker: MLflow on rank 0 attached to the stage's run (Ray's `setup_mlflow`,
    which returns a no-op on other ranks), or None with tracking off. `tracking` is {"uri", "experiment",
    "run_id", "stage"} from the driver; MLflow's `start_run` resumes the run named by MLFLOW_RUN_ID."""
    if not tracking:
        return None
    import ray.train
    from ray.air.integrations.mlflow import setup_mlflow

    if ray.train.get_context().get_world_rank() != 0:
        return None
    _quiet()
    os.environ["MLFLOW_RUN_ID"] = tracking["run_id"]
    return setup_mlflow(
        tracking_uri=tracking["uri"], experiment_name=tracking["experiment"], run_name=tracking["stage"]
    )
