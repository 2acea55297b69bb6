"""The mining job end to end on the synthetic world: both judge backends, re-sampling without the judge,
kill-and-resume of a real running job, and `ray job submit` against a local head on 127.0.0.1."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port, kill_when
from judge_tokens import tokenizer_counts

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config
from unime_ray.mining.agree import simulate
from unime_ray.mining.judge import TOKEN_COLUMNS, JudgeActor
from unime_ray.mining.pipeline import run_mining
from unime_ray.models.backbone import load_processor

ROOT = Path(__file__).parents[1]
PY = sys.executable


def _overrides(out: Path, *extra: str) -> list[str]:
    return [*synthetic_overrides(out), *extra]


def _cfg(out: Path, *extra: str):
    from unime_ray.assets import prepare_synthetic

    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", _overrides(out, *extra))
    prepare_synthetic(cfg)
    return cfg


def _scores(out: Path) -> pa.Table:
    files = sorted((out / "mining/judge/results").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by(
        [("query_id", "ascending"), ("rank", "ascending")]
    )


def _hard_negatives(out: Path) -> list[dict]:
    return pq.read_table(out / "mining/sample/hard_negatives.parquet").to_pylist()


def test_mine_end_to_end_then_resample_without_judge(local_ray, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, "data.datasets=[ShapesCLS, ShapesI2T]", "mining.top_n=8")
    report = run_mining(cfg)
    queries = report["ingest"]["queries"]
    assert queries == 2 * 48 and report["ingest"]["read"]["rows_out"] == queries
    scores = _scores(out)
    # every query judged with its positive and exactly its top-8 candidates, each pair once
    assert scores.num_rows == queries * (1 + 8)
    assert scores.group_by(["query_id", "cand_id"]).aggregate([]).num_rows == scores.num_rows
    hn = _hard_negatives(out)
    assert len(hn) + report["sample"]["queries_quarantined"] == queries
    assert all(len(r["neg_ids"]) == 10 and r["pos_id"] not in r["neg_ids"] for r in hn)
    first = {r["id"]: r["neg_ids"] for r in hn}
    official = json.loads((out / "mining/sample/hard_negatives.json").read_text())
    assert len(official) == len(hn)

    judged_mtimes = {p: p.stat().st_mtime_ns for p in (out / "mining/judge/results").glob("*.parquet")}
    report2 = run_mining(
        _cfg(out, "data.datasets=[ShapesCLS, ShapesI2T]", "mining.top_n=8", "mining.beta=0.5")
    )
    assert {p: p.stat().st_mtime_ns for p in judged_mtimes} == judged_mtimes  # no judge call
    assert report2["judge"] == report["judge"] and report2["sample"]["beta"] == 0.5
    assert {r["id"]: r["neg_ids"] for r in _hard_negatives(out)} != first


@pytest.mark.slow
def test_mine_with_vllm_judge_matches_transformers(local_ray, tmp_path):
    vl = tmp_path / "vllm"
    cfg = _cfg(vl, "data.datasets=[ShapesVQA]", "mining.top_n=4", "judge.backend=vllm")
    with _listeners() as seen:
        run_mining(cfg)
    # vLLM's engine (its message queue included) listened on loopback only.
    assert any("VLLM" in title or "JudgeActor" in title for _, title in seen), seen
    assert {ip for ip, _ in seen} <= {"127.0.0.1", "::1"}, seen
    b = _scores(vl)
    requests = pa.concat_tables(pq.read_table(p) for p in (vl / "mining/judge/requests").glob("*.parquet"))
    requests = requests.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert requests.select(["query_id", "cand_id"]).equals(b.select(["query_id", "cand_id"]))
    # The reference: the same requests through the transformers judge, as the stage's actor scores a
    # batch (in this process; a second mining run would only add its start-up).
    hf = dataclasses.replace(cfg.judge, backend="transformers")
    ref, ref_tokens, _ = JudgeActor(dataclasses.asdict(hf), cfg.data.image_root)._score(requests)
    diff = max(abs(x - y) for x, y in zip(ref, b["score"].to_pylist()))
    assert diff < 0.01

    # Token accounting: each call's prompt and image tokens as the tokenizer counts them, in both
    # backends; vLLM served part of each prompt from its prefix cache (query-first prompts, a query's
    # calls together), at least 60% of all prompt tokens, as the replay of its cache predicts.
    tokenizer = load_processor(vl / "models/qwen2-vl").tokenizer
    expected = tokenizer_counts(requests.to_pylist(), tokenizer, tokens_per_image=4)  # 56 px: 2 x 2
    assert list(zip(b["prompt_tokens"].to_pylist(), b["image_tokens"].to_pylist())) == expected
    columns = [TOKEN_COLUMNS.index(c) for c in ("prompt_tokens", "image_tokens")]
    assert [tuple(t) for t in ref_tokens[:, columns].tolist()] == expected
    cached, prompt = b["cached_tokens"].to_numpy(), b["prompt_tokens"].to_numpy()
    assert (cached % 32 == 0).all() and (cached < prompt).all()  # whole KV blocks, never the last token
    assert (b["cached_image_tokens"].to_numpy() <= b["image_tokens"].to_numpy()).all()
    tokens = json.loads((vl / "mining/judge/_SUCCESS.json").read_text())["report"]["tokens"]
    assert tokens["prompt_tokens"] == sum(e[0] for e in expected) and tokens["cached_tokens"] == cached.sum()
    assert tokens["cache_hit_rate"] >= 0.6, tokens
    replay = simulate(requests, cfg.judge, 4, 32)
    assert replay["cached_tokens"] == tokens["cached_tokens"], (replay, tokens)


@contextlib.contextmanager
def _listeners() -> Iterator[set[tuple[str, str]]]:
    """(address, process title) of every TCP listener opened by a vLLM or judge process while the block
    runs, sampled every 0.2 s."""
    import psutil

    seen: set[tuple[str, str]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for c in psutil.net_connections(kind="tcp"):
                if c.status != psutil.CONN_LISTEN or c.pid is None:
                    continue
                with contextlib.suppress(psutil.Error):
                    title = " ".join(psutil.Process(c.pid).cmdline())[:80]
                    if "VLLM" in title or "JudgeActor" in title:
                        seen.add((c.laddr.ip.removeprefix("::ffff:"), title))
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


# Small judge shards (2 queries x 21 calls), so that a kill lands between finished and unfinished ones;
# two of the four datasets, half the judge work of the whole world.
KILLED = (
    "data.datasets=[ShapesCLS, ShapesT2I]",
    "mining.top_n=20",
    "mining.judge_shard_queries=2",
    "judge.model.batch_size=4",
)


def _run_job(out: Path, *extra: str, **popen) -> subprocess.Popen:
    """`jobs/mine.py` on the tiny config in a child process; its console to `popen["stdout"]` (default: a
    pipe, for a job whose output is read with `communicate`)."""
    cmd = [PY, str(ROOT / "jobs/mine.py"), "--config", str(ROOT / "jobs/configs/tiny.yaml")]
    cmd += [a for o in _overrides(out, *extra) for a in ("--set", o)]
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def judge_actor_killed(local_ray, tmp_path_factory) -> tuple[Path, list]:
    """A mining run whose judge actor's process is SIGKILLed mid-stage (in this process, on the session's
    Ray). Two of the four datasets (96 queries, 48 judge shards): enough shards to kill between them."""
    out = tmp_path_factory.mktemp("actor-killed") / "run"
    cfg = _cfg(out, *KILLED)
    results = out / "mining/judge/results"
    with kill_when(lambda: len(list(results.glob("*.parquet"))) >= 3, "JudgeActor") as killed:
        run_mining(cfg)
    return out, killed


@pytest.mark.slow
def test_killed_judge_worker_is_replaced_and_every_pair_judged_once(judge_actor_killed):
    """Ray Data restarts the killed actor and retries its work; the stage still ends with every
    requested pair exactly once."""
    out, killed = judge_actor_killed
    assert killed, "the judge actor was never killed"
    requests = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "mining/judge/requests").glob("*.parquet"))]
    )
    scores = _scores(out)
    assert scores.num_rows == requests.num_rows
    assert scores.group_by(["query_id", "cand_id"]).aggregate([]).num_rows == scores.num_rows
    assert set(zip(scores["query_id"].to_pylist(), scores["cand_id"].to_pylist())) == set(
        zip(requests["query_id"].to_pylist(), requests["cand_id"].to_pylist())
    )


@pytest.mark.slow
def test_killed_job_resumes_with_every_pair_judged_exactly_once(judge_actor_killed, tmp_path):
    """The whole job (driver and all it started) SIGKILLed mid-judge, then run again: it resumes, and
    ends with the scores and hard negatives of a run of the same settings that went to the end in one
    job (the fixture's: its killed actor's work was retried within the job)."""
    clean, killed = judge_actor_killed[0], tmp_path / "killed"
    _cfg(killed, *KILLED)  # build world and models up front

    # The console of the job to be killed goes to a file, not a pipe: nobody reads a pipe while the test
    # waits (a full one would stall the job), and a failure shows how far the job got.
    console = tmp_path / "killed-job.log"
    with console.open("w") as out:
        job = _run_job(killed, *KILLED, start_new_session=True, stdout=out)
    results = killed / "mining/judge/results"
    start = time.time()
    while len(list(results.glob("*.parquet"))) < 5:  # mid-judge: some shards done, most not
        code, waited = job.poll(), time.time() - start
        if code is not None or waited > 300:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            state = f"it ended, exit code {code}" if code is not None else f"still short after {waited:.0f} s"
            pytest.fail(f"the job never got mid-judge ({state}); its console:\n{console.read_text()[-3000:]}")
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and everything it started, no cleanup
    job.wait()
    done_before = len(list(results.glob("*.parquet")))
    total = len((killed / "mining/judge/requests/_COMPLETE").read_text().split())
    assert 5 <= done_before < total

    resumed = _run_job(killed, *KILLED)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    assert "[mine] embed: done earlier, skipped" in log
    judge_report = json.loads((killed / "mining/judge/_SUCCESS.json").read_text())["report"]
    assert judge_report["shards_done_before"] >= done_before
    a, b = _scores(clean), _scores(killed)
    assert b.group_by(["query_id", "cand_id"]).aggregate([]).num_rows == b.num_rows  # no duplicates
    assert a.select(["query_id", "cand_id", "rank"]).equals(
        b.select(["query_id", "cand_id", "rank"])
    )  # none missing
    assert max(abs(x - y) for x, y in zip(a["score"].to_pylist(), b["score"].to_pylist())) < 1e-5
    # Sampling is discontinuous in the scores: batches formed differently after the resume move scores
    # by ~1e-7, which can reorder near-ties. Same queries and positives; nearly all negatives identical.
    hn_a, hn_b = _hard_negatives(clean), _hard_negatives(killed)
    assert [(r["id"], r["pos_id"]) for r in hn_a] == [(r["id"], r["pos_id"]) for r in hn_b]
    assert sum(a["neg_ids"] == b["neg_ids"] for a, b in zip(hn_a, hn_b)) >= 0.9 * len(hn_a)


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(local_ray, tmp_path):
    """A second cluster, started with `ray start`, next to the test session's own local Ray (as a user's
    laptop may run one): every port the head opens is chosen free, so neither steals the other's."""
    out = tmp_path / "job"
    extra = ("data.datasets=[ShapesCLS]", "mining.top_n=5")
    _cfg(out, *extra)
    bin_dir = Path(PY).parent
    # A head started with `ray start` requires its auth token; the client must be told to send it.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # Ray's fixed defaults (agent 52365, metrics, client 10001, ...) are taken by the session's cluster:
    # the head's job agent then never comes up ("No available agent to submit job").
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--num-cpus=2",
            *ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        submit = [
            str(bin_dir / "ray"),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--runtime-env",
            str(ROOT / "jobs/runtime_env.yaml"),
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/mine.py",
            "--config",
            "jobs/configs/tiny.yaml",
        ]
        submit += [a for o in _overrides(out, *extra) for a in ("--set", o)]
        deadline = time.time() + 300
        while True:  # the head's job agent takes seconds to come up (minutes on a loaded 2-core machine)
            res = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            starting = any(s in res.stdout + res.stderr for s in ("Connection", "try again later"))
            if res.returncode == 0 or time.time() > deadline or not starting:
                break
            time.sleep(2)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        assert "succeeded" in (res.stdout + res.stderr)
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # only this head's processes, not the test session's Ray
        head.wait()
        current = Path("/tmp/ray/ray_current_cluster")  # `ray stop` would remove it; we killed the head
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
    hn = _hard_negatives(out)
    assert len(hn) == 48 and all(len(r["neg_ids"]) == 10 for r in hn)
