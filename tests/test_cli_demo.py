"""The README's first command: `unime-ray demo` end to end, and the CLI surface."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config
from unime_ray.demo import run_demo

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_end_to_end(local_ray, tmp_path):
    """The README's first command, with fewer training steps: mine -> train both models -> evaluate
    before/after -> index + Serve on 127.0.0.1 -> one HTTP query -> Serve shut down."""
    out, port = tmp_path / "demo", free_port()
    steps = ["train.steps=4", "train.checkpoint_every=2", "reranker.steps=2", "reranker.checkpoint_every=2"]
    cfg = load_config(
        ROOT / "jobs/configs/tiny.yaml", synthetic_overrides(out) + steps + [f"serve.port={port}"]
    )
    report = run_demo(cfg)
    saved = json.loads((out / "demo_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    mined = saved["mining"]
    assert mined["queries"] == 4 * 48 and mined["quarantined_pairs"] == 0  # nothing quarantined, nothing lost
    assert mined["hard_negative_queries"] == mined["queries"]
    assert mined["judged_pairs"] == pq.read_table(out / "mining/judge/results").num_rows > mined["queries"]
    assert (out / "mining/sample/scores.png").is_file()

    # both trainings ran their steps and left a loadable peft adapter and a learning-curve plot
    for kind, n in (("train_embed", 4), ("train_rerank", 2)):
        assert saved[kind]["metrics"]["step"] == n
        adapter = Path(saved[kind]["weights"])
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (adapter / "adapter_model.safetensors").is_file() and Path(saved[kind]["curves"]).is_file()
    metrics = [json.loads(line) for line in (out / "train_embed/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]

    # evaluation: untrained and trained tables, the trained one with the listwise reranker, and deltas
    untrained = json.loads((out / "eval/untrained/results.json").read_text())
    trained = json.loads((out / "eval/trained/results.json").read_text())
    assert set(untrained["table3"]) == {"embedding"} and set(trained["table3"]) == {"embedding", "listwise"}
    assert trained["settings"]["embedder"].endswith(f"adapter {saved['train_embed']['weights']}")
    assert saved["eval"]["table3"] == trained["table3"]
    assert (out / "eval/trained/mmeb.png").is_file() and (out / "eval/compare/compare.md").is_file()
    deltas = json.loads((out / "eval/compare/compare.json").read_text())["deltas"]
    key = "table3.embedding.MMEB_Other"  # the synthetic sets are not among MMEB's 36
    before, after = (
        untrained["table3"]["embedding"]["MMEB_Other"],
        trained["table3"]["embedding"]["MMEB_Other"],
    )
    assert deltas[key] == {"a": before, "b": after, "delta": after - before}

    # the service answered over HTTP with captions of the indexed corpus, reranked listwise
    served = saved["serve"]
    captions = {
        c
        for line in (out / "world/retrieval/captions.jsonl").read_text().splitlines()
        for c in json.loads(line)["captions"]
    }
    assert served["index"]["count"] == len(captions)
    hits = served["answer"]["results"]
    assert len(hits) == 3 and all(h["text"] in captions for h in hits)
    assert served["answer"]["rerank"]["mode"] == "listwise"
    assert served["answer"]["rerank"]["candidates"] == cfg.serve.rerank_top
    with pytest.raises(OSError):  # Serve was shut down: nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


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
