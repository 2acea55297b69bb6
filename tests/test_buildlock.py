"""Stale build locks of torch's JIT extensions (`train/buildlock.py`): a lock that no process can hold is
removed; a fresh one, or one whose build folder a running process works in, is kept."""

import os
import subprocess
import time
from pathlib import Path

from unime_ray.train.buildlock import STALE_S, clear_stale_build_locks


def _lock(root: Path, name: str, age: float) -> Path:
    lock = root / "py311_cpu" / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age
    os.utime(lock, (then, then))
    return lock


def test_only_old_locks_of_idle_build_folders_are_removed(tmp_path):
    stale = _lock(tmp_path, "deepspeed_shm_comm", STALE_S + 60)
    fresh = _lock(tmp_path, "fresh_op", 5)
    building = _lock(tmp_path, "building_op", STALE_S + 60)
    # a compiler at work: a process whose working folder is inside the build folder
    (building.parent / "obj").mkdir()
    worker = subprocess.Popen(["sleep", "30"], cwd=building.parent / "obj")
    try:
        assert clear_stale_build_locks(tmp_path) == [stale]
    finally:
        worker.kill()
        worker.wait()
    assert not stale.exists() and fresh.exists() and building.exists()
    # once nothing works there, the old lock goes too; the fresh one stays until it is old
    assert clear_stale_build_locks(tmp_path) == [building]
    assert clear_stale_build_locks(tmp_path, now=time.time() + STALE_S + 10) == [fresh]
