"""What the benches that drive the project's own commands share: run one `unime-ray` command as a
subprocess, turn settings into `--set` arguments, read a finished run's outputs, and run a bench's
stages so that a stopped bench continues where it stopped (`Stages`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
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


class Stages:
    """A bench's resumable stages: each stage's figures go into one results file as the stage ends, and
    a stage whose figures are there is skipped, so a stopped bench continues where it stopped. `only`:
    run only the stages whose names start with one of these (empty: all), e.g. to share the cores
    between two processes on one results file."""

    def __init__(self, results_file: Path, settings: dict, only: list[str], tag: str) -> None:
        self.file, self.settings, self.only, self.tag = results_file, settings, only, tag

    def read(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.is_file() else {}

    def __call__(self, key: str, fn: Callable[..., dict], *fn_args) -> dict | None:
        """`fn(*fn_args)`'s figures under `key`, computed unless the results file has them already (None:
        a stage `only` leaves out, not done yet). Another process may write other stages meanwhile: the
        file is read again and merged before each write."""
        from unime_ray.io import write_json

        done = self.read()
        if key in done or (self.only and not key.startswith(tuple(self.only))):
            return done.get(key)
        print(f"[{self.tag}] {key}: started", flush=True)
        start = time.perf_counter()
        figures = {**fn(*fn_args), "stage_seconds": time.perf_counter() - start}
        write_json({**self.read(), "args": self.settings, key: figures}, self.file)
        print(f"[{self.tag}] {key}: done in {figures['stage_seconds']:.0f} s", flush=True)
        return figures
