"""`--run RUN_DIR`: a finished run's final weights come from its train_<kind>/_SUCCESS.json, never from
the names of the checkpoint folders beside it (several are kept), and a command given a run that has
not finished stops with one line naming the missing file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unime_ray.config import LoraConfig, ModelConfig
from unime_ray.runs import final_weights, run_overrides
from unime_ray.train.loop import lora_model

ROOT = Path(__file__).parents[1]


def _finished_run(run: Path, base: str, kinds=("embed",)) -> dict[str, list[Path]]:
    """A run folder as training leaves it: two kept checkpoints with different LoRA weights per kind,
    the marker naming the later one (its name sorts FIRST, so a glob-and-sort would pick the wrong one)."""
    made = {}
    for kind in kinds:
        adapters = []
        for i, name in enumerate(["checkpoint_2026-12-06_10", "checkpoint_2026-12-06_09"]):
            torch.manual_seed(i)
            model = lora_model(
                ModelConfig(path=base), LoraConfig(rank=2, alpha=4, dropout=0.0, use_dora=False), False
            )
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data.normal_()  # peft starts B at zero: the two adapters must differ
            adapter = run / "ray_train" / f"train_{kind}" / name / "adapter"
            model.save_pretrained(adapter)
            adapters.append(adapter)
        summary = {"checkpoint": str(adapters[1].parent), "weights": str(adapters[1])}
        (run / f"train_{kind}").mkdir(parents=True)
        (run / f"train_{kind}" / "_SUCCESS.json").write_text(json.dumps({"summary": summary}))
        made[kind] = adapters
    return made


def test_final_weights_and_overrides_follow_the_marker(tmp_path, tiny_qwen):
    run = tmp_path / "run"
    made = _finished_run(run, str(tiny_qwen), kinds=("embed", "rerank"))
    assert final_weights(run) == made["embed"][1] and final_weights(run, "rerank") == made["rerank"][1]
    assert run_overrides(run) == [
        f"run.output_dir={run}",
        f"embedder.path={tiny_qwen}",
        f"embedder.adapter={made['embed'][1]}",
        f"reranker.model.path={tiny_qwen}",
        f"reranker.model.adapter={made['rerank'][1]}",
    ]


def test_export_run_merges_the_final_adapter(tmp_path, tiny_qwen):
    run = tmp_path / "run"
    made = _finished_run(run, str(tiny_qwen))
    cli = [sys.executable, "-m", "unime_ray.cli", "export"]
    res = subprocess.run([*cli, "--run", str(run), str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(Path(tiny_qwen) / "model.safetensors")
    # independent check on every LoRA'd projection: W + B @ A * alpha / r from the FINAL adapter's own
    # tensors (the older adapter's B differs, so merging it would fail this)
    final, older = (load_file(a / "adapter_model.safetensors") for a in made["embed"][::-1])
    pairs = [k for k in final if k.endswith("lora_A.weight")]
    assert pairs
    for key in pairs:
        a, b = final[key], final[key.replace("lora_A", "lora_B")]
        assert not torch.equal(b, older[key.replace("lora_A", "lora_B")])
        name = key.split("language_model.", 1)[1].replace(".lora_A.weight", ".weight")
        (weight,) = [k for k in merged if k.endswith(f".{name}") and "visual" not in k]
        torch.testing.assert_close(merged[weight], base[weight] + (b @ a) * 2.0)


def test_a_run_that_did_not_finish_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    for command in (
        ["export", "--run", str(tmp_path / "run"), str(tmp_path / "out")],
        ["serve", "--run", str(tmp_path / "run")],
        ["eval", "--run", str(tmp_path / "run")],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "unime_ray.cli", *command], capture_output=True, text=True
        )
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "train_embed/_SUCCESS.json not found" in res.stderr and "Traceback" not in res.stderr


def test_a_mismatched_index_names_the_options_that_fix_it(tmp_path):
    """The refusal says which options select the embedder that built the index: `--run RUN_DIR` when
    that is the run's final embedder (the demo's index), else the embedder's own path and adapter."""
    from unime_ray.serve.index import FORMAT_VERSION, IndexMismatchError, read_meta

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "train_embed").mkdir()
    summary = {"weights": str(run / "adapter")}
    (run / "train_embed" / "_SUCCESS.json").write_text(json.dumps({"summary": summary}))
    built = {
        "path": "/m",
        "adapter": str((run / "adapter").resolve()),
        "weights": "w0",
        "adapter_weights": "a0",
    }
    built |= {"image_size": 56, "max_length": 256, "dim": 16}
    (run / "index").mkdir()
    (run / "index" / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "model": built}))
    serving = built | {"adapter": "", "adapter_weights": ""}
    with pytest.raises(IndexMismatchError, match=f"Use that embedder \\(--run {run}\\)"):
        read_meta(run / "index", serving)
    (run / "train_embed" / "_SUCCESS.json").write_text(json.dumps({"summary": {"weights": str(tmp_path)}}))
    with pytest.raises(IndexMismatchError) as e:  # the run trained another embedder since
        read_meta(run / "index", serving)
    assert f"--set embedder.path=/m --set embedder.adapter={built['adapter']}" in str(e.value)
