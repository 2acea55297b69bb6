"""The short chaos run (bench/chaos.py --quick, mining only, one seed): `unime-ray mine` as a subprocess
while Ray workers of its own local Ray are SIGKILLed every few seconds and its driver is SIGKILLed once
mid-judge, rerun until it succeeds; its outputs must equal a clean run's to the byte."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_mining_under_random_kills_equals_a_clean_run(tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, str(ROOT / "bench/chaos.py"), "--seeds", "0", "--quick", "--stages", "mine"]
    cmd += ["--interval", "3", "6", "--work", str(tmp_path / "work"), "--out", str(out), "--timeout", "300"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    seed = json.loads(out.read_text())["seeds"][0]
    mine = seed["stages"]["mine"]
    # the faults happened: the driver once, and at least one Ray worker
    assert mine["driver_kills"] == 1 and mine["attempts"] >= 2, mine
    assert mine["worker_kills"] >= 1, seed["kills"]
    mining = seed["checks"]["mining"]
    assert mining["judged_exactly_once"], mining
    # embeddings, candidates and judge scores equal to the bit; hard negatives equal to the byte
    assert {k: v for k, v in mining.items() if k != "report_counts_by_stage"} == {
        "embeddings": True,
        "candidates": True,
        "judge_scores": True,
        "hard_negatives_bytes": True,
        "report_counts": True,
        "judged_exactly_once": True,
    }, mining


def test_the_comparison_takes_nan_for_nan_and_sees_a_changed_value():
    """The chaos run's table comparison: the judge requests of positives carry a NaN `sim`, which
    Arrow's `equals` calls unequal to itself; a changed value or a null in its place must still count."""
    sys.path.insert(0, str(ROOT / "bench"))
    from chaos import _equal

    t = pa.table({"sim": pa.array([float("nan"), 0.5], pa.float32()), "id": ["a", "b"]})
    assert not t.equals(t) and _equal(t, t)
    assert not _equal(t, t.set_column(0, "sim", pa.array([float("nan"), 0.25], pa.float32())))
    assert not _equal(t, t.set_column(0, "sim", pa.array([None, 0.5], pa.float32())))
    assert not _equal(t, t.set_column(1, "id", pa.array(["a", "c"])))
