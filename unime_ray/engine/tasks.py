"""Ray tasks over a list of work items (a dataset, a file, a bucket), spread over the cluster's nodes.

Stages whose unit of work is bigger than a batch but independent of the others (retrieve one dataset,
sample one dataset's score files) run each unit as one Ray task: the driver only submits, collects small
results and writes nothing big, so its memory does not grow with the run. At most `max_in_flight` tasks
run at once (default: one per CPU of the cluster), which bounds the memory of the stage as a whole; each
task writes its own output file atomically, so a lost node loses only the units it was running, and
Ray runs those again (`max_retries`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray


def _run_on_node(fn: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    # ray.cancel stops a running task by raising KeyboardInterrupt in it, which Python cannot do where
    # SIGINT is ignored: a job started with `nohup` or `&` from a script passes SIG_IGN down to Ray's
    # workers, and a failed stage's other tasks would run on and write their outputs.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return fn(*args), ray.get_runtime_context().get_node_id()


def run_tasks(
    fn: Callable[..., Any],
    items: Sequence[tuple],
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_in_flight: int | None = None,
    max_retries: int = 3,
) -> Iterator[tuple[int, Any, str]]:
    """Run `fn(*item)` for every item as a Ray task; yield (item index, result, node id) as each ends.

    Tasks are scheduled with the SPREAD strategy, so the units of a stage land on every node. A table
    among the items' arguments is put into Ray's object store once, however many items share it. An
    exception inside `fn` (bad input) is raised here at once, not retried: only system failures (a dead
    worker or node) are."""
    remote = ray.remote(_run_on_node).options(
        num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy="SPREAD", max_retries=max_retries
    )
    limit = max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1) // max(num_cpus, 1e-3)))
    pending, running = list(enumerate(_tables_stored_once(items))), {}
    try:
        while pending or running:
            while pending and len(running) < limit:
                i, item = pending.pop(0)
                running[remote.remote(fn, *item)] = i  # refs among the args arrive resolved
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ref)
            result, node = ray.get(ref)
            yield i, result, node
    finally:
        _settle(list(running))


def _tables_stored_once(items: Sequence[tuple]) -> list[tuple]:
    """The items with each distinct `pa.Table` argument replaced by one object-store ref: Ray copies an
    argument into the store for every task it is passed to, so a table shared by N items would be
    stored N times (a stage's whole query table, once per file)."""
    refs: dict[int, ray.ObjectRef] = {}

    def stored(arg: Any) -> Any:
        if not isinstance(arg, pa.Table):
            return arg
        if id(arg) not in refs:
            refs[id(arg)] = ray.put(arg)
        return refs[id(arg)]

    return [tuple(stored(arg) for arg in item) for item in items]


def _settle(refs: list[ray.ObjectRef], timeout: float = 10) -> None:
    """Cancel the tasks still running when the caller stops early (one task's error, e.g. a full disk,
    or a caller that stopped reading) and take the outcomes of those that end within `timeout` s:
    Ray would otherwise print each one's error, traceback and all, as an unhandled one, after the
    stage's own error."""
    for ref in refs:
        ray.cancel(ref)
    ended, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
    for ref in ended:
        with contextlib.suppress(Exception):
            ray.get(ref)
