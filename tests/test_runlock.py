"""One job per run folder (unime_ray/runlock.py): real processes hold and contend for the lock of a run
folder; a crashed holder, a reused pid and a foreign host's lock with an old or a fresh heartbeat."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unime_ray import runlock
from unime_ray.assets import synthetic_overrides
from unime_ray.runlock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# A job that takes the run folder's lock as every command does, says so, then works for `seconds`. It
# takes Ctrl-C as a terminal's job does: started in the background by a non-interactive shell (as a
# test loop may be), it would inherit SIGINT ignored, and Python then installs no KeyboardInterrupt.
HOLD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from unime_ray.runlock import command_lock\n"
    "with command_lock(sys.argv[1], 'hold'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
)


def _hold(run: Path, seconds: float = 600) -> subprocess.Popen:
    """A holder process, returned once it holds the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), str(seconds)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _try(run: Path, seconds: float = 0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HOLD, str(run), str(seconds)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _foreign_lock(run: Path, age_s: float) -> None:
    """A lock written by a job on another node, whose last heartbeat was `age_s` seconds ago."""
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    holder = {"host": "node-b.example", "pid": 4242, "proc_start": "99", "command": "unime-ray mine"}
    lock.write_text(json.dumps({**holder, "started": "2026-01-01T00:00:00+00:00", "token": "b"}))
    then = time.time() - age_s
    os.utime(lock, (then, then))


def test_second_job_is_refused_naming_the_holder_and_ctrl_c_releases(tmp_path):
    run = tmp_path / "run"
    first = _hold(run)
    try:
        second = _try(run)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith("[hold] refused: ")
        assert f"pid {first.pid}," in lines[0] and f"host {socket.gethostname()}," in lines[0]
        assert "started 20" in lines[0] and "command `-c " in lines[0]
        assert second.stdout == ""  # never entered the locked block
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt unwinds through the lock
        first.wait(timeout=30)
    assert not (run / LOCK_NAME).exists()
    third = _try(run)
    assert third.returncode == 0 and third.stderr == "", third.stderr


def test_crashed_holder_is_stale_and_taken_over(tmp_path):
    run = tmp_path / "run"
    first = _hold(run)
    first.kill()  # SIGKILL: no cleanup, the lock file stays
    first.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid
    second = _try(run)
    assert second.returncode == 0, second.stderr
    assert "took over the stale lock" in second.stderr and "its process is gone" in second.stderr
    assert f"pid {first.pid}," in second.stderr
    assert not (run / LOCK_NAME).exists()  # and released on its normal exit


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """Same host, the pid alive but started at another time than the holder's: another process."""
    run = tmp_path / "run"
    run.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1", "command": "x"}
    (run / LOCK_NAME).write_text(json.dumps({**holder, "started": "then", "token": "t"}))
    with RunLock(run, "mine") as lock:
        assert "its process is gone" in lock.message
        assert json.loads((run / LOCK_NAME).read_text())["token"] == lock.token


def test_foreign_host_lock_by_heartbeat_age(tmp_path):
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    _foreign_lock(fresh, age_s=5)
    with pytest.raises(RunLockedError, match="host node-b.example, pid 4242"):
        RunLock(fresh, "mine").acquire()
    assert json.loads((fresh / LOCK_NAME).read_text())["token"] == "b"  # left alone
    _foreign_lock(old, age_s=runlock.STALE_S + 30)
    with RunLock(old, "mine") as lock:
        assert "no heartbeat for" in lock.message and "node-b.example" in lock.message
    assert not (old / LOCK_NAME).exists()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path, "mine") as lock:
        os.utime(lock.path, (0, 0))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5


def test_nested_lock_in_one_process_is_a_no_op(tmp_path):
    with RunLock(tmp_path, "demo"), RunLock(tmp_path, "mine"):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_many_jobs_racing_for_one_stale_lock_one_wins(tmp_path):
    """Four processes find the same stale lock at once: exactly one takes it over, the others are
    refused naming it (the break happens under a guard, so no two can both remove and create)."""
    run = tmp_path / "run"
    _foreign_lock(run, age_s=runlock.STALE_S + 30)
    cmd = [sys.executable, "-c", HOLD, str(run), "600"]  # the winner holds until stopped below
    procs = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    deadline = time.time() + 120
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.1)
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGINT)
    outs = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert len(running) == 1, outs
    winner = procs.index(running[0])
    assert outs[winner][1].startswith("held") and "took over the stale lock" in outs[winner][2]
    losers = [o for i, o in enumerate(outs) if i != winner]
    assert all(rc != 0 and "refused" in err and "Traceback" not in err for rc, _, err in losers), losers
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_second_unime_ray_mine_on_the_same_run_is_refused(tmp_path):
    """Two real `unime-ray mine` on one run folder: the second stops at once naming the first."""
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "unime-ray"),
        "mine",
        "--config",
        str(ROOT / "jobs/configs/tiny.yaml"),
    ]
    cmd += [a for o in synthetic_overrides(out) for a in ("--set", o)]
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 60
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, "the first job never took the lock"
            time.sleep(0.1)
        start = time.time()
        second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and first.poll() is None
        assert second.stderr.strip().startswith("[mine] refused: run folder")
        assert f"pid {first.pid}," in second.stderr and "unime-ray mine --config" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert time.time() - start < 30  # refused before Ray or any model is started
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
