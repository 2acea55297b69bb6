"""notebooks/quickstart.ipynb runs top to bottom in its own kernel (nbclient) and shows what it claims: the
judge-score plot, both learning curves and the eval plot inline, the eval table, and the service's 3 hits,
all from the files its stages wrote; and what it started listened on loopback (see the exceptions below).
Then the README's first command, `unime-ray demo` (the same stage functions in one go), reruns on the
notebook's outputs: one pipeline run for both, and the rerun shows that finished work is reused."""

import ast
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import free_port

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebook import LIMIT_BYTES, execute, machine_paths  # noqa: E402 (scripts/ is no package)

NOTEBOOK = ROOT / "notebooks/quickstart.ipynb"
STEPS = 2  # optimizer steps of each training in the notebook's run
CONSOLE_LINES = 200  # the demo's console budget (issue #15)


def _tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def _corpus_captions(out: Path) -> set[str]:
    """Every caption of the synthetic world's retrieval corpus under `out`: what the service indexes."""
    return {
        c
        for line in (out / "world/retrieval/captions.jsonl").read_text().splitlines()
        for c in json.loads(line)["captions"]
    }


@contextlib.contextmanager
def _listening() -> Iterator[tuple[set[tuple[str, int, int]], dict[int, set[str]]]]:
    """While the block runs, collect (address, port, pid) of every TCP listener among the descendants of
    this process (the kernel, its Ray processes and workers, Serve's proxy), and every title each of those
    processes showed (a Ray worker's title names its actor class, or the task it runs at the moment)."""
    listeners: set[tuple[str, int, int]] = set()
    titles: dict[int, set[str]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            procs = {p.pid: p for p in psutil.Process().children(recursive=True)}
            for pid, proc in procs.items():
                with contextlib.suppress(psutil.Error):  # it ended meanwhile
                    titles.setdefault(pid, set()).add(" ".join(" ".join(proc.cmdline()).split())[:100])
            listeners.update(
                (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port, c.pid)  # IPv4-mapped IPv6 too
                for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.pid in procs
            )
            done.wait(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield listeners, titles
    finally:
        done.set()
        thread.join()


def test_committed_notebook_shows_its_outputs():
    """Committed executed (scripts/run_notebook.py), so a reader on a code host sees its tables and plots:
    every code cell ran in order, none failed, the four plots and the result table are there, no output
    names a path of the machine that ran it, and it stays small. One parameters cell sets what the test
    replaces (the test executes it from scratch, its stored outputs cleared)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    assert any("text/markdown" in o.get("data", {}) for o in outputs)
    assert machine_paths(nb) == []
    assert NOTEBOOK.stat().st_size < LIMIT_BYTES
    (params,) = _tagged(nb, "parameters")
    assert params is code[0]
    assigned = [t.id for node in ast.parse(params.source).body for t in node.targets]
    assert assigned == ["OUT", "STEPS", "PORT"]


def test_machine_paths_are_found():
    """The check of the committed outputs finds a path of this machine, and only as a path."""
    cell = nbformat.v4.new_code_cell("x")
    nb = nbformat.v4.new_notebook(cells=[cell])
    cell.outputs = [nbformat.v4.new_output("stream", text=f"adapter: {ROOT}/runs/quickstart/x\n")]
    assert len(machine_paths(nb)) == 1
    cell.outputs = [nbformat.v4.new_output("stream", text="adapter: runs/quickstart/x; /tmpfile /workers\n")]
    assert machine_paths(nb) == []


@dataclass
class Quickstart:
    out: Path
    port: int
    nb: nbformat.NotebookNode  # as executed, with its outputs
    listeners: set[tuple[str, int, int]]
    titles: dict[int, set[str]]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Quickstart:
    """The notebook executed once for this module: its test checks what it showed, the demo's test then
    reruns the pipeline on its outputs."""
    tmp = tmp_path_factory.mktemp("notebook")
    out, port = tmp / "quickstart", free_port()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = _tagged(nb, "parameters")
    params.source = f"OUT = {str(out)!r}\nSTEPS = {STEPS}\nPORT = {port}\n"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)  # the kernel starts its own local Ray, joins none
        try:
            with _listening() as (listeners, titles):
                execute(nb)  # from scratch: the committed outputs are cleared first
        finally:  # what it showed, to look at when it fails
            nbformat.write(nb, tmp / "executed.ipynb")
    return Quickstart(out, port, nb, listeners, titles)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quickstart_notebook_runs(quickstart):
    out, port, nb = quickstart.out, quickstart.port, quickstart.nb
    listeners, titles = quickstart.listeners, quickstart.titles
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # The service listened on 127.0.0.1:PORT only, and Ray's processes (GCS, raylet, agents, workers,
    # Serve's HTTP proxy) and the kernel on loopback only, except two listeners that Ray and torch bind to
    # every interface with no option against it: torch.distributed's TCPStore on the rank-0 Train worker,
    # and the inter-deployment gRPC server every Serve replica opens on "[::]:0" (Ray 2.60,
    # ray/serve/_private/replica.py).
    assert {ip for ip, p, _ in listeners if p == port} == {"127.0.0.1"}
    wildcard_ok = ("ray::RayTrainWorker", "ray::ServeReplica:")
    wide = sorted(
        (ip, p, sorted(titles.get(pid, ())))
        for ip, p, pid in listeners
        if ip not in ("127.0.0.1", "::1")
        and not (ip == "::" and any(t.startswith(wildcard_ok) for t in titles.get(pid, ())))
    )
    assert not wide, "\n".join(map(str, wide))

    # the PNGs shown inline are the files the stages wrote
    shown = [
        base64.b64decode(o.data["image/png"])
        for o in outputs
        if o.output_type == "display_data" and "image/png" in o.data
    ]
    plots = [
        out / "mining/sample/scores.png",
        out / "train_embed/learning_curves.png",
        out / "train_rerank/learning_curves.png",
        out / "eval/trained/mmeb.png",
    ]
    assert len(shown) >= 4
    for plot in plots:
        assert plot.read_bytes() in shown, f"{plot} not shown"
    # the result tables as written (the settings above them name paths, which the notebook shortens)
    tables = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    written = (out / "eval/trained/results.md").read_text()
    assert written.startswith("# Evaluation results\n")
    assert sum(t.endswith(written[written.index("\n## ") :]) for t in tables) == 1

    # the service answered with 3 captions of the indexed corpus
    (serve_cell,) = _tagged(nb, "serve")
    printed = "".join(o.text for o in serve_cell.outputs if o.output_type == "stream" and o.name == "stdout")
    hits = [ast.literal_eval(m) for m in re.findall(r"^hit \d: (.*) \(cosine -?[\d.]+\)$", printed, re.M)]
    captions = _corpus_captions(out)
    assert len(hits) == 3 and all(h in captions for h in hits), printed

    # what the stages wrote: hard negatives for all 4 x 48 training queries, both trainings ran STEPS
    # steps, evaluation before and after training (the latter with the listwise reranker)
    assert pq.ParquetFile(out / "mining/sample/hard_negatives.parquet").metadata.num_rows == 4 * 48
    for kind in ("train_embed", "train_rerank"):
        metrics = [json.loads(line) for line in (out / kind / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "loss" in m] == list(range(1, STEPS + 1))
    # the reranker's ranking check: before training (step 0) and at its last step, on both samples
    checks = [m for m in metrics if "held_out_list_p@1" in m]
    assert [m["step"] for m in checks] == [0, STEPS] and all(0 <= m["train_point_p@1"] <= 100 for m in checks)
    untrained = json.loads((out / "eval/untrained/results.json").read_text())
    trained = json.loads((out / "eval/trained/results.json").read_text())
    assert set(untrained["table3"]) == {"embedding"} and set(trained["table3"]) == {"embedding", "listwise"}
    assert os.path.isfile(out / "eval/compare/compare.md")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_on_the_notebooks_outputs_redoes_no_finished_work(quickstart):
    """The README's first command, `unime-ray demo` (the notebook's stage functions in one go), run as a
    user runs it, on the notebook's outputs: no mining file rewritten, no training started, nothing
    embedded or reranked again; it still reports, evaluates, and serves one query over HTTP on 127.0.0.1,
    then shuts Serve down. Its console stays readable: our stage lines and a summary table, not Ray's
    logs, within a line budget."""
    out, port = quickstart.out, free_port()
    overrides = synthetic_overrides(out) + [f"train.steps={STEPS}", f"reranker.steps={STEPS}"]
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", overrides + [f"serve.port={port}"])
    mining_files = {f: f.stat().st_mtime_ns for f in (out / "mining").rglob("*.parquet")}
    trained = ("train_embed", "train_rerank")
    logs = {kind: (out / kind / "metrics.jsonl").read_text() for kind in trained}
    finals = {kind: (out / kind / "final_rank0.json").stat().st_mtime_ns for kind in trained}
    sets = [a for o in [*overrides, f"serve.port={port}"] for a in ("--set", o)]
    demo = subprocess.run(
        [str(Path(sys.executable).parent / "unime-ray"), "demo", *sets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    console = (demo.stdout + demo.stderr).splitlines()
    assert demo.returncode == 0, "\n".join(console[-80:])
    assert len(console) <= CONSOLE_LINES, "\n".join(console)
    for stage in ("mining", "train_embed", "train_rerank", "eval", "serve"):
        assert sum(line.startswith(f"[demo] {stage}: done in ") for line in console) == 1, stage
        assert sum(line.startswith(f"| {stage} | ") for line in console) == 1, stage  # the summary table
    for stage in ("ingest", "embed", "retrieve", "judge", "sample"):
        assert f"[mine] {stage}: done earlier, skipped" in console
    # Ray's own INFO lines stay in its log files, Serve's too (its import turns its logger back on)
    assert [line for line in console if "INFO" in line] == [], "Ray's INFO lines reached the console"
    # nor Ray's report of Serve's controller ending ("Task ServeController.graceful_shutdown failed")
    assert [line for line in console if "(raylet)" in line] == [], "\n".join(console)
    # the stage summaries say what their numbers are, rounded; the last line is the command that serves
    # what the demo built
    (evaluated,) = [line for line in console if line.startswith("[demo] eval: done in ")]
    assert re.search(
        r": P@1 in % over the synthetic eval sets: embedding \d+\.\d\d, listwise \d+\.\d\d$", evaluated
    )
    assert console[-1].endswith(f": .venv/bin/unime-ray serve --run {out} --set serve.port={port}"), console[
        -1
    ]
    saved = json.loads((out / "demo_report.json").read_text())

    # mining: every stage reused (not one parquet file rewritten), its counts reported
    assert {f: f.stat().st_mtime_ns for f in (out / "mining").rglob("*.parquet")} == mining_files
    mined = saved["mining"]
    assert mined["queries"] == 4 * 48 and mined["quarantined_pairs"] == 0  # nothing quarantined, nothing lost
    assert mined["hard_negative_queries"] == mined["queries"]
    assert mined["judged_pairs"] == pq.read_table(out / "mining/judge/results").num_rows > mined["queries"]

    # training: both runs were found finished with these settings and not started again (no worker
    # wrote its final summary, no step logged again); their LoRA adapters and learning curves are what
    # the demo reports
    for kind in trained:
        assert f"[{kind.replace('_', '-')}] done earlier (step {STEPS}), skipped" in console
        assert (out / kind / "metrics.jsonl").read_text() == logs[kind]
        assert (out / kind / "final_rank0.json").stat().st_mtime_ns == finals[kind]
        assert saved[kind]["metrics"]["step"] == STEPS
        adapter = Path(saved[kind]["weights"])
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (adapter / "adapter_model.safetensors").is_file() and Path(saved[kind]["curves"]).is_file()

    # evaluation from the caches: nothing embedded or reranked; the trained table has the listwise
    # reranker, and the comparison its deltas
    untrained = json.loads((out / "eval/untrained/results.json").read_text())
    trained = json.loads((out / "eval/trained/results.json").read_text())
    for results in (untrained, trained):
        assert results["work"]["items_embedded"] == results["work"]["rerank_requests_computed"] == 0
    assert set(untrained["table3"]) == {"embedding"} and set(trained["table3"]) == {"embedding", "listwise"}
    assert trained["settings"]["embedder"].endswith(f"adapter {saved['train_embed']['weights']}")
    assert saved["eval"]["table3"] == trained["table3"]
    deltas = json.loads((out / "eval/compare/compare.json").read_text())["deltas"]
    key = "table3.embedding.MMEB_Other"  # the synthetic sets are not among MMEB's 36
    before, after = (
        untrained["table3"]["embedding"]["MMEB_Other"],
        trained["table3"]["embedding"]["MMEB_Other"],
    )
    assert deltas[key] == {"a": before, "b": after, "delta": after - before}

    # the service answered over HTTP with captions of the indexed corpus, reranked listwise
    served = saved["serve"]
    captions = _corpus_captions(out)
    assert served["index"]["count"] == len(captions) and served["index"]["added"] == 0  # none embedded again
    hits = served["answer"]["results"]
    assert len(hits) == 3 and all(h["text"] in captions for h in hits)
    assert served["answer"]["rerank"]["mode"] == "listwise"
    assert served["answer"]["rerank"]["candidates"] == cfg.serve.rerank_top
    with pytest.raises(OSError):  # Serve was shut down: nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_marked_doc_commands_run_as_written_after_the_demo(quickstart, tmp_path):
    """Every ```bash block the docs mark as runnable (tests/doc_commands.py), run as a reader runs it,
    from the repository folder after `unime-ray demo`: here a scratch folder whose runs/tiny is a copy
    of this module's demo run (the notebook's, which the demo test reran). Each command exits 0 and
    writes what its `# -> PATH` comment says. The `serve` blocks' server starts once, answers their
    requests, and stops on Ctrl-C with exit 0."""
    from doc_commands import bare, blocks, on_port, scratch_repo, writes

    repo = scratch_repo(quickstart.out, tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}

    def sh(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-o", "pipefail", "-ec", command],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    marked = blocks()
    runs = [(b.page.name, c) for b in marked if b.mode == "run" for c in b.commands]
    assert len(runs) >= 4
    for page, command in runs:
        res = sh(command)
        assert res.returncode == 0, f"{page}: {command}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        if writes(command):
            assert (repo / writes(command)).exists(), f"{page}: {command} did not write {writes(command)}"

    serving = [b for b in marked if b.mode == "serve"]
    (server,) = {bare(b.commands[0]) for b in serving}  # every page serves the demo's run the same way
    requests = [(b.page.name, c) for b in serving for c in b.commands[1:]]
    port = free_port()
    proc = subprocess.Popen(
        ["bash", "-ec", "exec " + on_port(server, port, serve=True)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    failed = None
    try:
        # a reader waits for the line that says it serves: /healthz answers as soon as the Ingress
        # replica runs, which can be before `serve.run` has returned and the line is printed
        deadline = time.monotonic() + 300
        while not any(f"serving http://127.0.0.1:{port}" in line for line in lines):
            assert proc.poll() is None, "the server stopped"
            assert time.monotonic() < deadline, "the server did not say it serves in 300 s"
            time.sleep(1)
        for page, command in requests:
            res = sh(on_port(command, port), timeout=120)
            assert res.returncode == 0, f"{page}: {command}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    except AssertionError as e:
        failed = e
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the docs say
        proc.wait(timeout=120)
        reader.join(timeout=30)
    console = "".join(lines)
    assert failed is None, f"{failed}\nthe server's console:\n{console[-3000:]}"
    assert proc.returncode == 0, console[-3000:]
