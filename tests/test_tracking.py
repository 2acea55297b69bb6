"""MLflow tracking (`unime_ray/tracking.py`) on a real run: mining, the embedder's training (rank 0
logging inside Ray Train) and an evaluation of the synthetic world, read back with MLflow's own client
and compared with the stages' own files: report.json, metrics.jsonl, results.json."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from unime_ray.config import load_config
from unime_ray.demo import mine_with_oracle
from unime_ray.eval.job import run_eval
from unime_ray.tracking import TAG_RUN_DIR, TAG_STAGE, log_stage, metric_name, store_uri
from unime_ray.train.run import train

ROOT = Path(__file__).parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("tracked")
    overrides = mine_with_oracle(ROOT / "jobs/configs/tiny.yaml", out)
    more = [f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.report_every=2"]
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", overrides + more + ["eval.suites=[mmeb]"])
    summary = train(cfg, "embed")
    assert train(cfg, "embed") == summary  # done earlier: skipped, the same summary, no second nested run
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
    _, _, summary, _, client, runs = tracked
    run = _stage(runs, "train_embed")
    rows = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for name in ("loss", "p@1", "lr", "samples_per_s"):
        history = client.get_metric_history(run.info.run_id, metric_name(name))
        assert sorted((m.step, m.value) for m in history) == [(r["step"], r[name]) for r in rows], name
    assert run.data.params["checkpoint"] == summary["checkpoint"]
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
