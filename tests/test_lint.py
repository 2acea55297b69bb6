"""ruff is part of the test suite, so CI fails on lint like on any other test."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
    root = Path(__file__).parents[1]
    res = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
