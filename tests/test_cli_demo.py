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


def test_a_misspelt_set_key_is_one_line_naming_the_closest_keys():
    res = subprocess.run(
        [sys.executable, "-m", "unime_ray.cli", "config", "--config", "jobs/configs/tiny.yaml"]
        + ["--set", "mining.betta=0.02"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and res.stdout == ""
    closest = "mining.beta, mining.delta, mining.top_n"
    assert res.stderr == f"error: --set: unknown key 'mining.betta'; closest: {closest}\n"


def test_help_texts_end_their_sentences():
    """Each command's --help description is its docstring's whole first paragraph, not its first line."""
    for command in ("demo", "export"):
        res = subprocess.run(
            [sys.executable, "-m", "unime_ray.cli", command, "--help"], capture_output=True, text=True
        )
        description = res.stdout.split("\n\n")[1]
        assert description.rstrip().endswith("."), description
    res = subprocess.run(
        [sys.executable, "-m", "unime_ray.cli", "make-world", "--help"], capture_output=True, text=True
    )
    assert res.stdout.startswith("usage: unime-ray make-world ")
