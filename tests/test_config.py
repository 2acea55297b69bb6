import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from unime_ray.config import Config, ConfigError, describe, load_config, parse_override

ROOT = Path(__file__).parents[1]

# serve.yaml is a Ray Serve config file (`serve run`), checked in the serve tests.
CONFIGS = sorted(
    p for p in Path(__file__).parents[1].joinpath("jobs", "configs").glob("*.yaml") if p.name != "serve.yaml"
)


def test_every_shipped_config_loads():
    assert {p.stem for p in CONFIGS} >= {
        "tiny",
        "qwen2-vl-2b",
        "qwen2-vl-7b",
        "llava-ov-7b",
        "reranker-qwen2.5-vl-7b",
    }
    for path in CONFIGS:
        assert isinstance(load_config(path), Config)


def test_paper_hyper_parameters_in_big_configs():
    q = load_config(CONFIGS[0].with_name("qwen2-vl-7b.yaml"))
    assert (q.train.lora.rank, q.train.tau, q.train.lr, q.train.steps) == (16, 0.02, 1e-4, 2000)
    assert (q.train.global_batch_size, q.mining.top_n, q.mining.interval, q.train.num_negatives) == (
        1024,
        50,
        5,
        8,
    )
    assert load_config(CONFIGS[0].with_name("llava-ov-7b.yaml")).train.lr == 2e-5
    r = load_config(CONFIGS[0].with_name("reranker-qwen2.5-vl-7b.yaml")).reranker
    assert (r.lora.rank, r.lora.alpha, r.lr, r.list_size) == (128, 256, 2e-5, 5)


def test_overrides_are_typed_and_dotted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mining:\n  beta: 0.05\ntrain:\n  lora:\n    rank: 4\n")
    cfg = load_config(f, ["mining.beta=0.02", "train.lora.target_modules=[q_proj, v_proj]", "train.steps=7"])
    assert cfg.mining.beta == 0.02 and cfg.train.lora.rank == 4 and cfg.train.steps == 7
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(None, ["mining.delta=1"]).mining.delta == 1.0  # int widens to float
    assert isinstance(load_config(None, ["mining.delta=1"]).mining.delta, float)
    assert parse_override("run.output_dir=/a=b") == ("run.output_dir", "/a=b")
    # YAML 1.1 reads `5e-3` (no dot) as a string; a float field takes it as 0.005 all the same
    assert load_config(None, ["train.lr=5e-3"]).train.lr == 0.005


@pytest.mark.parametrize(
    "override, message",
    [
        ("mining.betta=0.1", "--set: unknown key 'mining.betta'; closest: mining.beta, mining.delta"),
        ("train.lora.rnak=2", "unknown key 'train.lora.rnak'; closest: train.lora.rank"),
        ("nope.x=1", "unknown key 'nope'; known: data, embedder, eval"),
        ("train.steps=ten", "train.steps: expected int, got str"),
        ("train.steps=true", "train.steps: expected int, got bool"),
        ("judge.backend=openai", "judge.backend: 'openai' is not one of"),
        ("train.lora.target_modules=[1]", "train.lora.target_modules[0]: expected str"),
        ("mining=3", "mining: expected a mapping"),
        ("mining.beta", "must look like section.key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_a_bad_override_is_blamed_on_set_not_on_the_file():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "jobs/configs/tiny.yaml", ["train.stpes=3"])
    assert str(e.value) == "--set: unknown key 'train.stpes'; closest: train.steps, train.loss, train.tau"


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.lr: expected float"):
        load_config(f)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_describe_is_a_complete_reference_with_values_and_help():
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", ["mining.beta=0.05"])
    rows = describe(cfg)
    # one row per leaf of the config, in the same order, with the loaded value
    assert [(k, v) for k, _, v, _ in rows] == list(_leaves(dataclasses.asdict(cfg)).items())
    by_key = {k: (tp, v, text) for k, tp, v, text in rows}
    assert by_key["mining.beta"][:2] == ("float", 0.05)
    assert by_key["train.lora.rank"][0] == "int" and by_key["train.loss"][0].startswith("Literal")
    assert all(text for _, _, _, text in rows)  # every key documents itself
    res = subprocess.run(
        [sys.executable, "-m", "unime_ray.cli", "config", "--set", "train.steps=7"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0 and "train.steps = 7  [int]" in res.stdout
