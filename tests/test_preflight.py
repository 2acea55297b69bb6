"""Preflight: a job with a wrong setting stops before any Ray work with ONE message naming the config key
to fix; a stage that leaves nothing for the next says which stage and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from unime_ray.config import load_config
from unime_ray.mining.pipeline import main, run_mining
from unime_ray.preflight import PreflightError, check_job, check_model_folder

ROOT = Path(__file__).parents[1]


def _args(world: Path, model: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f"run.output_dir={out}",
        f"data.train_dir={world}/train",
        f"data.image_root={world}/images",
        "data.synthetic=false",
        f"embedder.path={model}",
        f"judge.model.path={model}",
        *extra,
    ]
    return ["--config", str(ROOT / "jobs/configs/tiny.yaml"), *(a for s in sets for a in ("--set", s))]


def _stops(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return str(stop.value)


def test_missing_or_empty_data_folder(world, tiny_qwen, tmp_path):
    message = _stops(_args(tmp_path / "nowhere", tiny_qwen, tmp_path / "run"))
    assert message == f"[mine] stopped: data.train_dir: no folder {tmp_path / 'nowhere'}/train"
    (tmp_path / "empty/train").mkdir(parents=True)
    message = _stops(_args(tmp_path / "empty", tiny_qwen, tmp_path / "run"))
    assert "data.train_dir:" in message and "holds no data files (.parquet, .jsonl, .json)" in message


def test_model_folder_without_config_weights_or_tokenizer(world, tiny_qwen, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_qwen, broken)
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    message = _stops(_args(world, broken, tmp_path / "run"))
    assert message == (
        f"[mine] stopped: embedder.path: {broken} lacks weights (*.safetensors or pytorch_model*.bin), "
        "a tokenizer (tokenizer.json or tokenizer_config.json)"
    )
    (broken / "config.json").unlink()
    with pytest.raises(PreflightError, match=r"judge.model.path: .* lacks config.json"):
        check_model_folder(str(broken), "judge.model.path")


def test_output_folder_not_writable(world, tiny_qwen, tmp_path):
    (tmp_path / "file").write_text("")
    message = _stops(_args(world, tiny_qwen, tmp_path / "file/run"))
    assert message.startswith(f"[mine] stopped: run.output_dir: cannot write to {tmp_path / 'file/run'}")


def test_gpu_settings_on_a_machine_without_gpu(world, tiny_qwen, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    message = _stops(_args(world, tiny_qwen, tmp_path / "run", "mining.gpus_per_actor=1"))
    assert message == (
        "[mine] stopped: mining.gpus_per_actor asks for a GPU, but this machine has none and no Ray "
        "cluster is set"
    )
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [f"run.output_dir={tmp_path}", "train.use_gpu=true"])
    with pytest.raises(PreflightError, match="^train.use_gpu asks for a GPU"):
        check_job(cfg, "train_embed")


def test_wrong_image_root_stops_after_ingest_with_counts_and_the_path_looked_for(
    local_ray, world, tiny_qwen, tmp_path
):
    wrong = tmp_path / "pictures"
    message = _stops(_args(world, tiny_qwen, tmp_path / "run", f"data.image_root={wrong}"))
    # Every dataset has image rows; the first one (files in name order) is reported.
    first = json.loads((world / "world.json").read_text())
    assert message.startswith("[mine] stopped: dataset 'ShapesCLS': 48 of 48 rows quarantined")
    assert "{'missing_image': 48}" in message and "data.max_quarantined_fraction = 0.5" in message
    assert f"e.g. row 0 of {world}/train/ShapesCLS.jsonl, field qry_image_path: {wrong}/" in message
    assert first  # the world manifest exists: the data was there, only the image root was wrong


def test_a_stage_left_empty_names_the_stage_and_why(local_ray, tmp_path, tiny_qwen):
    # One dataset whose queries all share one positive: the pool is that positive alone, so retrieve
    # finds no candidate for anyone.
    (tmp_path / "train").mkdir()
    rows = [
        {"qry": f"question {i}", "qry_image_path": "", "pos_text": "yes", "pos_image_path": ""}
        for i in range(4)
    ]
    (tmp_path / "train/Same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", _args(tmp_path, tiny_qwen, tmp_path / "run")[1::2][1:])
    with pytest.raises(PreflightError, match="retrieve found no candidate for any query"):
        run_mining(cfg)


def test_training_job_checks_its_model_folder(tmp_path):
    from unime_ray.train.run import main as train_main

    sets = [f"run.output_dir={tmp_path}", f"train.model.path={tmp_path / 'none'}", "data.synthetic=false"]
    with pytest.raises(SystemExit) as stop:
        train_main(
            ["--config", str(ROOT / "jobs/configs/tiny.yaml"), *(a for s in sets for a in ("--set", s))]
        )
    assert str(stop.value) == (
        f"[train-embed] stopped: train.model.path: no model folder '{tmp_path / 'none'}' "
        "(a local Hugging Face folder; no hub)"
    )
