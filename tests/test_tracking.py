"""MLflow tracking (`unime_ray/tracking.py`) on a real run: mining, the embedder's training (rank 0
logging inside Ray Train; killed once, then resumed by a rerun) and an evaluation of the synthetic world,
read back with MLflow's own client and compared with the stages' own files: report.json, metrics.jsonl,
results.json."""

import json
from pathlib import Path

import pytest
from conftest import kill_when, registered_step
from mlflow import MlflowClient
from ray.train import TrainingFailedError

from unime_ray.config import load_config
from unime_ray.demo import mine_with_oracle
from unime_ray.eval.job import run_eval
from unime_ray.inspector import build_report
from unime_ray.mining.pipeline import _track
from unime_ray.tracking import (
    TAG_RUN_DIR,
    TAG_STAGE,
    end_stage,
    log_stage,
    metric_name,
    start_stage,
    store_uri,
)
from unime_ray.train.run import train

ROOT = Path(__file__).parents[1]
STEPS, EVERY = 8, 2  # optimizer steps, and a checkpoint every EVERY steps
LONGER = STEPS + 2  # the step budget of a rerun that continues the run


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("tracked")
    overrides = mine_with_oracle(ROOT / "jobs/configs/tiny.yaml", out)
    more = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.report_every=2"]
    more += ["train.max_failures=0"]  # a killed worker ends the run, as a killed job would
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", overrides + more + ["eval.suites=[mmeb]"])
    # killed once a checkpoint is registered, then rerun with the same settings: it resumes
    checkpointed = lambda: registered_step(out / "ray_train/train_embed") >= EVERY  # noqa: E731
    with kill_when(checkpointed, "RayTrainWorker") as killed, pytest.raises(TrainingFailedError):
        train(cfg, "embed")
    assert killed, "no worker was killed"
    summary = train(cfg, "embed")
    assert summary["metrics"]["step"] == STEPS
    assert train(cfg, "embed") == summary  # done earlier: skipped, the same summary, no second nested run
    # rerun with a larger step budget: the same run goes on, in the same nested run
    cfg = load_config(
        ROOT / "jobs/configs/tiny.yaml", overrides + more + ["eval.suites=[mmeb]", f"train.steps={LONGER}"]
    )
    summary = train(cfg, "embed")
    assert summary["metrics"]["step"] == LONGER
    results = run_eval(cfg)
    client = MlflowClient(store_uri(cfg))
    (experiment,) = [e for e in client.search_experiments() if e.name == cfg.tracking.experiment]
    runs = client.search_runs([experiment.experiment_id])
    return out, cfg, summary, results, client, runs


def _stage(runs, stage):
    """The stage's latest nested run (mining ran twice: to retrieve, then with the oracle's scores)."""
    return max((r for r in runs if r.data.tags.get(TAG_STAGE) == stage), key=lambda r: r.info.start_time)


def test_one_parent_run_with_a_nested_run_per_stage(tracked):
    out, _, _, _, _, runs = tracked
    (parent,) = [r for r in runs if TAG_RUN_DIR in r.data.tags]
    assert parent.data.tags[TAG_RUN_DIR] == str(out.resolve())
    children = [r for r in runs if r is not parent]
    assert sorted(r.data.tags[TAG_STAGE] for r in children) == ["eval", "mining", "mining", "train_embed"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)


def test_mining_metrics_are_its_report(tracked):
    out, cfg, _, _, client, runs = tracked
    run = _stage(runs, "mining")
    report = json.loads((out / "mining" / "report.json").read_text())
    assert run.data.metrics["sample.queries_out"] == report["sample"]["queries_out"]
    assert run.data.metrics["ingest.queries"] == report["ingest"]["queries"]
    assert run.data.params["mining.beta"] == str(cfg.mining.beta)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"inspect.html", "scores.png", "report.json"} <= names


def test_training_steps_logged_from_rank_0_equal_metrics_jsonl(tracked):
    """The killed attempt, the resumed one and the longer rerun in one nested run: every row of
    metrics.jsonl (the steps the killed attempt logged past its checkpoint appear twice, as they do in
    the file). Its parameters are those it was opened with, the changed ones also as `latest.` tags."""
    out, _, summary, _, client, runs = tracked
    run = _stage(runs, "train_embed")
    rows = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert sorted(set(steps)) == list(range(1, LONGER + 1)) and steps.count(1) == 1
    assert steps.count(STEPS + 1) == 1  # the longer rerun went on from the end of the budget before
    resumed = json.loads((out / "train_embed/final_rank0.json").read_text())["resumed_from"]
    assert resumed == STEPS
    assert run.data.params["train.steps"] == str(STEPS) and run.data.tags["latest.train.steps"] == str(LONGER)
    for name in ("loss", "p@1", "lr", "samples_per_s"):
        history = client.get_metric_history(run.info.run_id, metric_name(name))
        assert sorted((m.step, m.value) for m in history) == sorted((r["step"], r[name]) for r in rows), name
    assert json.loads((out / "train_embed/_RUN.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert run.data.tags["latest.checkpoint"] == summary["checkpoint"] != run.data.params["checkpoint"]
    assert "learning_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_eval_metrics_are_its_results(tracked):
    _, _, _, results, client, runs = tracked
    run = _stage(runs, "eval")
    datasets = results["mmeb"]["datasets"]
    assert len(datasets) >= 3
    for name, entry in datasets.items():
        assert run.data.metrics[f"mmeb.datasets.{name}.scores.embedding"] == pytest.approx(
            entry["scores"]["embedding"]
        )
    assert {"results.json", "results.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_tracking_off_writes_no_store(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "tracking.enabled=false"])
    log_stage(cfg, "mining", 0.0, metrics={"x": 1.0})
    assert not (tmp_path / "mlruns").exists()
    on = load_config(None, [f"run.output_dir={tmp_path}"])
    log_stage(on, "mining", 0.0, metrics={"x": 1.0})
    (run,) = MlflowClient(store_uri(on)).search_runs(
        [e.experiment_id for e in MlflowClient(store_uri(on)).search_experiments()],
        filter_string=f"tags.`{TAG_STAGE}` = 'mining'",
    )
    assert run.data.metrics == {"x": 1.0}


def test_mining_without_an_image_root_logs_the_inspector_page(mined_run, world, tmp_path):
    """An empty data.image_root: the page is logged all the same, without thumbnails (the inspector embeds
    only files under an image root)."""
    cfg = load_config(
        None, [f"run.output_dir={mined_run}", "data.image_root=", f"tracking.uri={tmp_path.as_uri()}"]
    )
    _track(cfg, json.loads((mined_run / "mining/report.json").read_text()), 0.0)
    client = MlflowClient(cfg.tracking.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, filter_string=f"tags.`{TAG_STAGE}` = 'mining'")
    page = Path(client.download_artifacts(run.info.run_id, "inspect.html", str(tmp_path))).read_text()
    assert page == build_report(mined_run, None)
    with_images = build_report(mined_run, world / "images")
    assert page.count('class="query"') == with_images.count('class="query"') > 0
    assert "data:image/jpeg;base64," in with_images and "data:image/jpeg;base64," not in page
    images = with_images.count('<img class="thumb"') + with_images.count("image not found")
    assert page.count("image not found") == images


def test_a_continued_run_keeps_its_first_parameters(tmp_path):
    """start_stage(resume=) reopens a finished run of the same stage only; end_stage adds the parameters
    it lacks and sets each changed one as a `latest.` tag (MLflow refuses to change a parameter)."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    run_id = start_stage(cfg, "train_embed")
    end_stage(cfg, run_id, params={"train": {"steps": 8}, "checkpoint": "a"})
    assert start_stage(cfg, "train_embed", resume=run_id) == run_id
    end_stage(cfg, run_id, params={"train": {"steps": 10, "lr": 0.1}, "checkpoint": "b"}, metrics={"x": 1.0})
    run = MlflowClient(store_uri(cfg)).get_run(run_id)
    assert run.data.params == {"train.steps": "8", "checkpoint": "a", "train.lr": "0.1"}
    assert run.data.tags["latest.train.steps"] == "10" and run.data.tags["latest.checkpoint"] == "b"
    assert run.info.status == "FINISHED" and run.data.metrics == {"x": 1.0}
    assert start_stage(cfg, "train_rerank", resume=run_id) not in (None, run_id)  # another stage's run
    assert start_stage(cfg, "train_embed", resume="0" * 32) not in (None, "0" * 32)  # not in the store
