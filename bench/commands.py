"""What the benches that drive the project's own commands share: run one `unime-ray` command as a
subprocess, turn settings into `--set` arguments, and read a finished run's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "unime_ray.cli"]


def run(*args: str) -> float:
    """One project command; returns its wall time, stops the bench when it fails."""
    start = time.perf_counter()
    print("$ unime-ray", " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def overrides(settings: dict) -> list[str]:
    """{key: value} -> ["--set", "key=value", ...]."""
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


def world_settings(out: Path, world: Path) -> dict:
    """The settings that point a run at `out` and at the MMEB files of a world folder (`make-world`)."""
    return {
        "run.output_dir": out,
        "data.synthetic": "false",
        "data.train_dir": world / "train",
        "data.eval_dir": world / "eval",
        "data.image_root": world / "images",
    }


def weights(out: Path, kind: str) -> str:
    """The final weights of a finished training run, as its _SUCCESS.json names them."""
    return json.loads((out / f"train_{kind}/_SUCCESS.json").read_text())["summary"]["weights"]


def scores(results: Path) -> dict[str, dict]:
    """{dataset: {mode: P@1 %, ...}} from an eval folder's results.json, with "unparsed": the listwise
    answers that named no candidate, when the reranker ran."""
    datasets = json.loads((results / "results.json").read_text())["mmeb"]["datasets"]
    return {
        name: {
            **{mode: round(v, 2) for mode, v in d["scores"].items()},
            **({"unparsed": d["unparsed"]} if "unparsed" in d else {}),
        }
        for name, d in datasets.items()
    }
