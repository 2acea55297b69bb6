"""Multi-node behaviour on one machine: Ray's own `ray.cluster_utils.Cluster` starts a head and worker
raylets as separate nodes (each with its own CPUs, object store and workers, all on 127.0.0.1) and the
real jobs run on it. The mining job's judge actor pool and its retrieve and sample tasks spread over
nodes, and losing a worker node mid-judge loses no finished shard, every pair still judged exactly
once; a training run whose two workers sit on two nodes loses one node and resumes from its last
registered checkpoint.

The pytest process may hold the session's local Ray and a driver joins one cluster only, so the
scenarios run in a child interpreter (this file as a script: `python tests/test_multinode.py OUT`) that
starts the cluster, mines (removing a node), lets a fresh node join, trains on the hard negatives it
just mined (removing a node again) and writes `OUT/multinode.json`; the tests assert on that report and
on the jobs' own output files. One cluster for both: its start-up is paid once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port, registered_step

ROOT = Path(__file__).parents[1]
TINY = ROOT / "jobs/configs/tiny.yaml"
# All four synthetic datasets (retrieve and sample spread their four groups over the nodes): 96 judge
# shards of 2 queries x (1 + TOP_N) calls, enough judge work (a minute here) for the pool to grow to two
# actors before it ends.
TOP_N = 10
MINE = [
    f"mining.top_n={TOP_N}",
    "mining.num_actors=2",
    "mining.judge_shard_queries=2",
    "judge.model.batch_size=2",
]
# Two workers of one CPU each on one-CPU nodes: they cannot share a node.
TRAIN_STEPS, CHECKPOINT_EVERY = 6, 2
TRAIN = [
    f"train.steps={TRAIN_STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.max_failures=2",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
]


# ---------------------------------------------------------------- the child side (a fresh interpreter)


def _node_args(**args) -> dict:
    """Loopback only, and free ports where Ray would otherwise take a fixed default: the head's dashboard
    agent listens on 52365 unless told, and a second Ray on this machine (the test session's) has it."""
    ports = ("dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
    return {"node_ip_address": "127.0.0.1", **{p: free_port() for p in ports}, **args}


@contextlib.contextmanager
def _cluster(workers: int) -> Iterator[tuple]:
    """A head and `workers` worker nodes, one CPU each, with this process connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    from unime_ray.ray_utils import init_ray

    # As init_ray does for a local Ray (the environment variable is set by the test for the raylets and
    # workers): otherwise Ray swaps 127.0.0.1 for the machine's routable address.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    head = _node_args(num_cpus=1, include_dashboard=False, dashboard_port=free_port())
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = [cluster.add_node(**_node_args(num_cpus=1)) for _ in range(workers)]
        cluster.wait_for_nodes()
        # the project's own way of joining a cluster; verbose: the workers' lines ("resumed at step")
        # reach the child's log, where the test reads them
        init_ray(cluster.address, verbose=True)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        # Cluster() wrote its address for `ray.init("auto")`: leave no pointer to a dead cluster behind.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip() == cluster.address:
            current.unlink()


def _listening() -> set[tuple[str, str]]:
    """(address, process title) of every TCP listener of the cluster (descendants of this process)."""
    import psutil

    procs = {p.pid: p for p in psutil.Process().children(recursive=True)}
    procs[os.getpid()] = psutil.Process()
    found = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            with contextlib.suppress(psutil.Error):
                title = " ".join(procs[c.pid].cmdline())[:80]
                found.add((c.laddr.ip.removeprefix("::ffff:"), title))  # IPv4-mapped IPv6 too
    return found


def _actors(marker: str) -> list[dict]:
    """Alive actors whose process title holds `marker`, with their node, from the GCS actor table (the
    public `ray.util.state.list_actors` needs the dashboard, which these clusters do not run). Ray Data's
    pool actors are all of class `_MapWorker`; the title names the callable, e.g.
    `ray::MapWorker(MapBatches(_read_shards)->MapBatches(JudgeActor))`."""
    from ray._private import state

    found = []
    for a in state.actors().values():
        if a["State"] != "ALIVE":
            continue
        try:
            title = Path(f"/proc/{a['Pid']}/cmdline").read_text()
        except OSError:  # it ended meanwhile
            continue
        if marker in title:
            found.append({"actor": a["ActorID"], "node": a["Address"]["NodeID"]})
    return found


def _run_removing_a_node(
    cluster,
    workers: list,
    job: Callable[[dict], dict],
    marker: str,
    ready: Callable[[], dict | None],
    replace: bool,
) -> dict:
    """Run `job(info)` in a thread; meanwhile watch the actors titled `marker` and, once they are alive on
    two nodes at once and `ready()` returns a dict, remove a worker node hosting one of them (all its
    processes killed, as when a machine goes away) and, with `replace`, add a fresh node, as an
    autoscaler would (from this, the main thread: Ray's Node installs a signal handler). Returns `info`,
    filled with what was seen and done, and the job's result."""
    import ray

    by_id = {n.node_id: n for n in workers}
    info: dict = {"head": cluster.head_node.node_id, "workers": list(by_id), "removal": {}}
    info["before"], info["after"] = {}, {}  # actor -> the nodes it was seen alive on, around the removal
    listening = _listening()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = job(info)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the main thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():
        actors = _actors(marker)
        seen = info["after"] if info["removal"] else info["before"]
        for a in actors:
            nodes = seen.setdefault(a["actor"], [])
            if a["node"] not in nodes:
                nodes.append(a["node"])
        nodes = sorted({a["node"] for a in actors})
        victims = [n for n in nodes if n in by_id]
        state = ready() if not info["removal"] and len(nodes) >= 2 and victims else None
        if state is not None:
            listening.update(_listening())  # everything is up now
            cluster.remove_node(by_id[victims[0]])
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            added = cluster.add_node(**_node_args(num_cpus=1)).node_id if replace else None
            info["removal"] = {**state, "nodes": nodes, "node": victims[0], "alive": alive, "added": added}
        time.sleep(0.2)
    thread.join()
    info["listening"] = sorted(listening)
    if "error" in outcome:
        raise outcome["error"]
    return {**info, **outcome["result"]}


def _child(out: Path) -> dict:
    from unime_ray.assets import prepare_synthetic, synthetic_overrides
    from unime_ray.config import load_config
    from unime_ray.mining.pipeline import run_mining
    from unime_ray.train.loop import run_training

    cfg = load_config(TINY, [*synthetic_overrides(out), *MINE])
    prepare_synthetic(cfg)
    results = out / "mining/judge/results"

    def judging() -> dict | None:
        finished = sorted(results.glob("*.parquet"))
        return {"finished": {p.name: p.stat().st_mtime_ns for p in finished}} if finished else None

    def mine(info: dict) -> dict:
        runs = []
        for _ in range(2):  # the job, on the nodes left; a rerun only if it failed
            try:
                report = run_mining(cfg)
                runs.append(
                    {"ok": True, **{stage: report[stage] for stage in ("retrieve", "judge", "sample")}}
                )
                break
            except Exception as e:  # noqa: BLE001 - reported; the test decides
                runs.append({"ok": False, "error": repr(e)[-3000:]})
                if not info["removal"]:
                    raise
        return {"runs": runs}

    run_dir = out / "ray_train/train_embed"

    def checkpointed() -> dict | None:
        step = registered_step(run_dir)
        return {"checkpoint_step": step} if step >= CHECKPOINT_EVERY else None

    def train(info: dict) -> dict:
        # the hard negatives just mined (the tiny random judge's: what is learnt does not matter here)
        summary = run_training(load_config(TINY, [*synthetic_overrides(out), *TRAIN]), "embed")
        return {"checkpoint": summary["checkpoint"], "final_step": summary["metrics"]["step"]}

    # Three one-CPU nodes: a judge actor takes a CPU, so a pool of two is on two nodes by construction,
    # and so are two training workers.
    with _cluster(workers=2) as (cluster, workers):
        mined = _run_removing_a_node(cluster, workers, mine, "JudgeActor", judging, replace=False)
        left = [n for n in workers if n.node_id != mined["removal"]["node"]]
        left.append(cluster.add_node(**_node_args(num_cpus=1)))  # as an autoscaler would
        cluster.wait_for_nodes()
        trained = _run_removing_a_node(cluster, left, train, "RayTrainWorker", checkpointed, replace=True)
    return {"mine": mined, "train": trained}


# ---------------------------------------------------------------- the test side


CHILD_TIMEOUT = 900  # both scenarios; ~5 minutes on a quiet 2-core machine


@pytest.fixture(scope="module")
def multinode(tmp_path_factory) -> tuple[Path, dict]:
    """The child's run (see the module docstring): its output folder and its report."""
    # Loopback for the raylets and workers too (see _cluster); no progress bars in the log.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path_factory.mktemp("multinode") / "run"
    out.mkdir()
    try:
        with (out / "child.log").open("w") as log:
            cmd = [sys.executable, __file__, str(out)]
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT
            )
    except subprocess.TimeoutExpired:  # killed; Ray's reaper then takes its cluster down
        pytest.fail(f"still running after {CHILD_TIMEOUT} s\n" + (out / "child.log").read_text()[-6000:])
    assert proc.returncode == 0, (out / "child.log").read_text()[-6000:]
    return out, json.loads((out / "multinode.json").read_text())


def _table(files: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in files])


def _check_spread_and_removal(report: dict, wildcard_ok: str = "") -> dict:
    head, workers = report["head"], set(report["workers"])
    # Every node, agent and worker process listens on loopback only, except processes titled
    # `wildcard_ok`, which may listen on `::`: torch.distributed's TCPStore (on the rank-0 Train worker)
    # binds every interface whatever host it is given, and torch has no option against it (gloo's own
    # sockets are on loopback).
    wide = [(ip, title) for ip, title in report["listening"] if ip != "127.0.0.1"]
    assert all(ip == "::" and wildcard_ok and title.startswith(wildcard_ok) for ip, title in wide), wide
    assert any(ip == "127.0.0.1" for ip, _ in report["listening"])
    removal = report["removal"]
    assert removal, f"no node was removed: {report}"
    # Spread: while the job ran, its actors were alive on two nodes at the same time, and the removed
    # node (a worker node, not the head with the driver) hosted one of them.
    assert len(removal["nodes"]) == 2 and set(removal["nodes"]) <= workers | {head}
    assert removal["node"] in workers and removal["node"] in removal["nodes"]
    assert removal["node"] not in removal["alive"] and head in removal["alive"]
    return removal


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_mining_spreads_judge_actors_and_survives_losing_a_worker_node(multinode):
    out, report = multinode[0], multinode[1]["mine"]
    removal = _check_spread_and_removal(report)

    # Removed mid-judge: some shards were done, not all.
    total = len((out / "mining/judge/requests/_COMPLETE").read_text().split())
    assert 1 <= len(removal["finished"]) < total

    # The job ended well (on the surviving nodes, or in a rerun), and no finished shard was redone.
    runs = report["runs"]
    assert runs[-1]["ok"], runs
    if len(runs) == 2:
        assert runs[-1]["judge"]["shards_done_before"] >= len(removal["finished"])
    results = out / "mining/judge/results"
    for name, mtime in removal["finished"].items():
        assert (results / name).stat().st_mtime_ns == mtime, f"{name} was written again"
    assert len(list(results.glob("*.parquet"))) == total

    # Every (query, candidate) pair exactly once, none missing: each query with its positive and its
    # retrieved top-N, as the ingest and retrieve stages wrote them.
    queries = pq.read_table(out / "mining/ingest/queries.parquet")
    retrieved = _table(sorted((out / "mining/retrieve").glob("*.parquet")))
    pool = pq.read_table(out / "mining/ingest/pool.parquet")["dataset"].value_counts().to_pylist()
    top_n = {p["values"]: min(TOP_N, p["counts"] - 1) for p in pool}  # the query's own positive is excluded
    per_query = retrieved.group_by("query_id").aggregate([("cand_id", "count_distinct")]).to_pylist()
    dataset = dict(zip(queries["id"].to_pylist(), queries["dataset"].to_pylist(), strict=True))
    assert len(per_query) == queries.num_rows
    assert all(q["cand_id_count_distinct"] == top_n[dataset[q["query_id"]]] for q in per_query)
    expected = set(zip(queries["id"].to_pylist(), queries["pos_id"].to_pylist(), strict=True))
    expected |= set(zip(retrieved["query_id"].to_pylist(), retrieved["cand_id"].to_pylist(), strict=True))
    assert len(expected) == retrieved.num_rows + queries.num_rows
    scores = _table(sorted(results.glob("*.parquet")))
    pairs = list(zip(scores["query_id"].to_pylist(), scores["cand_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected
    hard = pq.read_table(out / "mining/sample/hard_negatives.parquet")
    assert hard.num_rows == queries.num_rows

    # Retrieve and sample ran as Ray tasks on more than one node: retrieve's four datasets before the
    # removal (three nodes), sample's four groups of score files after it (the head and one worker).
    retrieve = {name: stats for name, stats in runs[-1]["retrieve"].items() if isinstance(stats, dict)}
    assert len(retrieve) == 4 and len({stats["node"] for stats in retrieve.values()}) >= 2, retrieve
    assert runs[-1]["sample"]["nodes"] >= 2, runs[-1]["sample"]


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_training_loses_a_worker_node_and_resumes_from_its_last_checkpoint(multinode):
    out, report = multinode[0], multinode[1]["train"]
    removal = _check_spread_and_removal(report, wildcard_ok="ray::RayTrainWorker")
    assert removal["added"] and removal["checkpoint_step"] >= CHECKPOINT_EVERY

    # The run finished all its steps after the loss, by resuming from a registered checkpoint at or
    # after the one seen before the removal, never from step 0 ...
    log = (out / "child.log").read_text()
    resumed = {int(m) for m in re.findall(r"\[train-embed\] resumed at step (\d+)", log)}
    assert len(resumed) == 1, resumed  # one restart, both ranks from the same checkpoint
    resumed_from = resumed.pop()
    assert removal["checkpoint_step"] <= resumed_from < TRAIN_STEPS
    assert resumed_from % CHECKPOINT_EVERY == 0
    # ... and the metrics say so: 1, 2, ..., k from the first group (k >= the step it resumed from), then
    # resumed + 1, ..., the last step from the second.
    metrics = (out / "train_embed/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics]
    cut = len(steps) - (TRAIN_STEPS - resumed_from)
    first, second = steps[:cut], steps[cut:]
    assert first == list(range(1, len(first) + 1)) and len(first) >= resumed_from, steps
    assert second == list(range(resumed_from + 1, TRAIN_STEPS + 1)), steps
    assert report["final_step"] == TRAIN_STEPS

    # The final checkpoint is whole, and both ranks of the restarted group ended on the same weights.
    checkpoint = Path(report["checkpoint"])
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == TRAIN_STEPS
    assert (checkpoint / "adapter/adapter_config.json").is_file()
    finals = [json.loads(p.read_text()) for p in sorted((out / "train_embed").glob("final_rank*.json"))]
    assert [f["step"] for f in finals] == [TRAIN_STEPS] * 2
    assert finals[0]["trainable_param_sum"] == finals[1]["trainable_param_sum"]
    # A new group of two workers did the rest, on the nodes left (one of them, maybe, the new one).
    new = {actor: nodes for actor, nodes in report["after"].items() if actor not in report["before"]}
    assert len(new) == 2 and all(removal["node"] not in nodes for nodes in new.values()), report


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    (out_dir / "multinode.json").write_text(json.dumps(_child(out_dir), indent=1))
