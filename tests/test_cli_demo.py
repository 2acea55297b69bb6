"""The CLI surface. (`unime-ray demo` end to end runs in tests/test_notebook.py, on the notebook's
outputs.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


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
