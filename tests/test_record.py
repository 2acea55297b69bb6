"""A run records itself (`unime_ray/record.py`): a run made with `--set` values records them, with the
code and library versions checked here against git and importlib independently; a command started from
the run folder without --config gets the recorded values; and a stage redone with other settings names
exactly the keys that changed."""

import argparse
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import ray
import torch
from mined import BETA
from test_inspect import Page
from test_runs import _finished_run

from unime_ray.cli import main as cli
from unime_ray.config import add_config_args, config_from_args, load_config
from unime_ray.inspector import build_report
from unime_ray.mining.pipeline import run_mining
from unime_ray.record import RECORD, changed_keys, read_record, record_stage

ROOT = Path(__file__).parents[1]


def test_a_mining_run_records_its_config_and_versions(mined_run, world):
    record = json.loads((mined_run / RECORD).read_text())
    assert record["last"] == "mining"
    entry = record["stages"]["mining"]
    config = entry["config"]
    assert config["mining"]["beta"] == BETA != 0.01  # the --set value, not the default
    assert config["data"]["image_root"] == str(world / "images")
    assert config["run"]["output_dir"] == str(mined_run)
    assert entry["libraries"]["ray"] == ray.__version__
    assert entry["libraries"]["torch"] == torch.__version__
    assert entry["libraries"]["peft"] == importlib.metadata.version("peft")
    assert entry["package"]["version"] == importlib.metadata.version("unime-ray")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert entry["package"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert entry["host"] and entry["started"] and entry["command"]


def test_inspect_needs_no_image_root_or_config(mined_run, world, tmp_path, capsys):
    out = tmp_path / "inspect.html"
    cli(["inspect", str(mined_run), "--out", str(out), "--queries", "2"])
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    assert page == build_report(mined_run, world / "images", queries=2)
    assert any(src.startswith("data:image/") for src in Page(page).sources)  # the images were found


def _copy_run(mined_run: Path, tmp_path: Path) -> Path:
    """The mined run in another folder; its embedding and score files stay where they are, so only the
    settings a test changes differ from the finished stages' own."""
    run = tmp_path / "run"
    shutil.copytree(mined_run, run)
    record = read_record(run)
    record["stages"]["mining"]["config"]["run"]["output_dir"] = str(run)
    (run / RECORD).write_text(json.dumps(record))
    return run


def test_a_stage_redone_with_other_settings_names_the_keys(mined_run, tmp_path, capsys):
    run = _copy_run(mined_run, tmp_path)
    args = argparse.Namespace(config=None, overrides=["mining.beta=0.2", "mining.interval=3"], run=None)
    cfg = config_from_args(args, recorded_in=run)  # the recorded config, two keys changed
    capsys.readouterr()
    run_mining(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert "[mine] judge: done earlier, skipped" in lines
    assert "[mine] sample: settings changed (sample.beta, sample.interval), redoing it" in lines
    entry = read_record(run)["stages"]["mining"]
    assert entry["config"]["mining"]["beta"] == 0.2 and entry["config"]["mining"]["interval"] == 3
    # the next command reads the values recorded last
    again = config_from_args(argparse.Namespace(config=None, overrides=[], run=None), recorded_in=run)
    assert (again.mining.beta, again.mining.interval, again.data.image_root) == (0.2, 3, cfg.data.image_root)


def test_record_stage_returns_exactly_the_changed_keys(tmp_path):
    base = [f"run.output_dir={tmp_path}"]
    assert record_stage(load_config(None, base), tmp_path / "eval") == []
    changed = load_config(None, [*base, "eval.top_k=5", "embedder.adapter=/a", "train.lora.rank=4"])
    assert record_stage(changed, tmp_path / "eval") == ["embedder.adapter", "eval.top_k", "train.lora.rank"]
    assert record_stage(changed, tmp_path / "eval") == []
    assert record_stage(changed, tmp_path / "elsewhere") == []  # another stage folder: its own entry
    assert set(read_record(tmp_path)["stages"]) == {"eval", "elsewhere"}
    assert changed_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}, "d": 0}) == ["a.c", "d"]


def test_run_reads_the_recorded_config_then_the_weights_then_set(tmp_path, tiny_qwen):
    """What eval, serve and build-index get from `--run RUN_DIR` without --config: the run's recorded
    config, its final weights over it, and --set over both."""
    run = tmp_path / "run"
    made = _finished_run(run, str(tiny_qwen), kinds=("embed",))
    recorded = load_config(ROOT / "jobs/configs/tiny.yaml", [f"run.output_dir={run}", "eval.top_k=7"])
    record_stage(recorded, run / "eval")
    p = argparse.ArgumentParser()
    add_config_args(p, default="jobs/configs/tiny.yaml", run=True)
    cfg = config_from_args(p.parse_args(["--run", str(run), "--set", "serve.port=9123"]))
    assert (cfg.eval.top_k, cfg.serve.port, cfg.embedder.adapter) == (7, 9123, str(made["embed"][1]))
    # with --config, the file is the base and the record is not read
    cfg = config_from_args(
        p.parse_args(["--run", str(run), "--config", str(ROOT / "jobs/configs/tiny.yaml")])
    )
    assert cfg.eval.top_k == 10 and cfg.embedder.adapter == str(made["embed"][1])
