"""The README's first command: `unime-ray demo` end to end, and the CLI surface."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config
from unime_ray.demo import run_demo

ROOT = Path(__file__).parents[1]


def test_demo_end_to_end(local_ray, tmp_path):
    out = tmp_path / "demo"
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", synthetic_overrides(out))
    report = run_demo(cfg)
    saved = json.loads((out / "demo_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    mined = saved["mining"]
    assert mined["queries"] == 4 * 48 and mined["quarantined_pairs"] == 0  # nothing quarantined, nothing lost
    assert mined["hard_negative_queries"] == mined["queries"]
    assert mined["judged_pairs"] == pq.read_table(out / "mining/judge/results").num_rows > mined["queries"]
    assert saved["read_eval"] == {"rows_in": 4 * 24, "rows_out": 4 * 24}
    assert set(saved["mmeb_p@1_untrained"]) == {"ShapesCLS", "ShapesVQA", "ShapesI2T", "ShapesT2I"}
    assert all(0.0 <= v <= 100.0 for v in saved["mmeb_p@1_untrained"].values())
    assert (out / "mining/sample/scores.png").is_file()


@pytest.mark.parametrize("command", ["demo", "make-tiny", "make-world"])
def test_every_command_has_help(command):
    res = subprocess.run(
        [sys.executable, "-m", "unime_ray.cli", command, "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "usage:" in res.stdout


def test_unknown_command_lists_commands():
    res = subprocess.run([sys.executable, "-m", "unime_ray.cli", "bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "make-tiny" in res.stdout


def test_make_tiny_cli(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "unime_ray.cli", "make-tiny", str(tmp_path / "m"), "--arch", "llava-ov"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llava_onevision"
