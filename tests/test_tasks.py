"""engine.tasks.run_tasks on a real local Ray: every item once, results as they end, at most
`max_in_flight` at a time, a task whose worker process dies is run again (the unit of a lost node), and
an error in the work itself is raised at once, not retried."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray.cloudpickle

from unime_ray.engine.tasks import run_tasks
from unime_ray.io import write_json

# Ray's workers cannot import this test module: send its task functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _work(i: int, out: Path, die_once: bool) -> int:
    """Write out/<i>.json; with `die_once`, the first attempt kills its own worker process first."""
    attempts = out / f"{i}.attempts"
    with attempts.open("a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    if die_once and len(attempts.read_text().splitlines()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # this attempt's interval ends at its start
    time.sleep(0.3)
    write_json({"item": i}, out / f"{i}.json")
    with attempts.open("a") as f:
        f.write(f"end {time.time()}\n")
    return i * i


def _bad(i: int) -> int:
    raise ValueError(f"item {i} is bad input")


def _bad_or_slow(i: int, out: Path) -> int:
    """Item 0 fails at once; the others wait until out/release exists, then write out/<i>.json."""
    if i == 0:
        raise ValueError("item 0 is bad input")
    while not (out / "release").exists():
        time.sleep(0.05)
    write_json({"item": i}, out / f"{i}.json")
    return i


def test_every_item_once_and_a_killed_task_is_run_again(local_ray, tmp_path):
    items = [(i, tmp_path, i == 2) for i in range(5)]
    got = {i: (result, node) for i, result, node in run_tasks(_work, items, max_in_flight=2)}
    assert {i: result for i, (result, _) in got.items()} == {i: i * i for i in range(5)}
    assert all(node == local_ray.get_runtime_context().get_node_id() for _, node in got.values())
    lines = {i: (tmp_path / f"{i}.attempts").read_text().split() for i in range(5)}
    # item 2: a killed attempt (start only), then one that ran (start, end); the others ran once
    assert [len(lines[i]) for i in range(5)] == [4, 4, 6, 4, 4]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"{i}.json" for i in range(5)]
    # Never more than two at once: the attempts' [start, end] intervals (the killed one ends where it
    # starts) overlap at most two deep at any attempt's start (50 ms of slack for clock reads).
    spans = [(float(lines[2][1]), float(lines[2][1]))]
    for i in range(5):
        start, end = (float(lines[i][k]) for k in ((1, 3) if i != 2 else (3, 5)))
        spans.append((start, end))
    for start, _ in spans:
        assert sum(s <= start < e - 0.05 for s, e in spans) <= 2, sorted(spans)


def test_an_error_in_the_work_is_raised_not_retried(local_ray):
    with pytest.raises(ValueError, match="item 1 is bad input"):
        list(run_tasks(_bad, [(1,)]))


def test_an_error_stops_the_tasks_still_running(local_ray, tmp_path):
    """A stage that fails (bad input, a full disk) does not leave its other tasks running on to write
    their outputs (onto a full disk, the space freed by the failed write) after the driver gave up:
    they are cancelled before the error reaches the caller."""
    with pytest.raises(ValueError, match="item 0 is bad input"):
        list(run_tasks(_bad_or_slow, [(0, tmp_path), (1, tmp_path)], max_in_flight=2))
    # Item 1 cannot have finished before the error: it waits for this file. Had it not been cancelled,
    # it would write its output within a poll of seeing the file (with no cancel, this test fails here).
    (tmp_path / "release").touch()
    time.sleep(5)
    assert not list(tmp_path.glob("*.json"))


def _table_sum(table, k: int) -> int:
    return pc.sum(table["x"]).as_py() * k


def test_a_table_shared_by_items_is_stored_once(local_ray, monkeypatch):
    import unime_ray.engine.tasks as tasks

    puts = []
    real_put = ray.put
    monkeypatch.setattr(tasks.ray, "put", lambda value: puts.append(value) or real_put(value))
    shared, other = pa.table({"x": [1, 2, 3]}), pa.table({"x": [10]})
    items = [(shared, k) for k in range(4)] + [(other, 5)]
    got = dict((i, result) for i, result, _ in run_tasks(_table_sum, items))
    assert got == {0: 0, 1: 6, 2: 12, 3: 18, 4: 50}  # each task read its own table's values
    assert len(puts) == 2 and puts[0] is shared and puts[1] is other  # one copy per distinct table
