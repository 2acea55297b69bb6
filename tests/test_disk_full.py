"""A full disk, on a real small filesystem: a size-limited tmpfs mounted for the test (root only, as in
CI; skipped with the reason elsewhere). A write that meets ENOSPC leaves nothing under the file's name
and says the file, the bytes it needed and the bytes free; a mining job that fills its disk mid-stage
stops with that one line, keeps only whole files, and once space is freed resumes to outputs identical,
byte for byte, to those of a run that never met the full disk; a training whose checkpoint fills it
stops with one line too, and its rerun never starts from the partial checkpoint."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from planted import planted_embeddings

from unime_ray.assets import synthetic_overrides
from unime_ray.config import Config, load_config
from unime_ray.data.synthetic import make_world, write_oracle_scores
from unime_ray.demo import mine_with_oracle
from unime_ray.io import DiskFullError, atomic_path, disk_full, file_sha256, write_parquet, write_text
from unime_ray.mining import pipeline

ROOT = Path(__file__).parents[1]


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` while the block runs, unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CAP_SYS_ADMIN); this test runs as a user")
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode:
            subprocess.run(["umount", "-l", str(path)])


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk` (tmpfs counts whole pages)."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    return ballast


def test_a_write_that_fills_the_disk_leaves_the_old_file_and_says_path_and_bytes(tmp_path):
    with small_disk(tmp_path / "fs", "256k") as disk:
        target = disk / "out" / "table.parquet"
        old = write_parquet(pa.table({"x": [1, 2, 3]}), target)
        before = file_sha256(old)
        table = pa.table({"x": np.random.default_rng(0).random(100_000)})  # 800 KB that do not compress
        with pytest.raises(DiskFullError) as info:
            write_parquet(table, target)
        e = info.value
        assert e.errno == errno.ENOSPC and e.filename == str(target)
        free = shutil.disk_usage(disk).free
        assert str(e).startswith(f"{target}: no space left on the device writing it: it needed about ")
        assert f"about {table.nbytes:,} bytes (the table's size in memory" in str(e)
        assert f", {free:,} bytes are free there" in str(e)
        # The finished file is the old one, whole; no temporary file is left to eat the space.
        assert file_sha256(target) == before and pq.read_table(target).num_rows == 3
        assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]
        # A text file's size is known exactly; the error survives pickling (a Ray task's error does).
        text = "y" * 400_000
        with pytest.raises(DiskFullError) as info:
            write_text(text, disk / "out" / "big.txt")
        assert f"it needed {len(text):,} bytes, " in str(info.value)
        again = pickle.loads(pickle.dumps(info.value))
        assert str(again) == str(info.value) and again.errno == errno.ENOSPC
        assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]
        # FAISS says ENOSPC only in a RuntimeError's text, after filling every free byte: still a
        # DiskFullError, its size unknown but more than what it wrote, and that space given back.
        index = faiss.IndexFlatIP(8)
        index.add(np.zeros((100_000, 8), np.float32))  # 3.2 MB
        free = shutil.disk_usage(disk).free
        said = f"it needed more than the {free:,} bytes written before the device filled (size unknown), "
        with pytest.raises(DiskFullError, match=re.escape(f"{said}{free:,} bytes are free there")):
            with atomic_path(disk / "out" / "x.index") as tmp:
                faiss.write_index(index, str(tmp))
        assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]


def test_a_raw_enospc_is_found_behind_other_errors_and_named():
    raw = OSError(errno.ENOSPC, "No space left on device", "/data/x.bin")
    try:
        try:
            raise raw
        except OSError as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as outer:
        found = disk_full(outer, "/data")
    assert isinstance(found, DiskFullError) and found.filename == "/data/x.bin"
    said = "/data/x.bin: no space left on the device (No space left on device); the bytes it needed are "
    said += "not known, "
    assert str(found).startswith(said)
    assert disk_full(ValueError("bad row"), "/data") is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), "/data") is None


def _argv(run: Path, world: Path, emb: Path | None = None, scores: Path | None = None) -> list[str]:
    """`unime-ray mine` arguments; the bring-your-own files only once they exist (the preflight checks)."""
    sets = [*synthetic_overrides(world), f"run.output_dir={run}", "data.synthetic=false"]
    if emb:
        sets += ["embedder.backend=precomputed", f"embedder.embeddings_path={emb}"]
    if scores:
        sets += ["judge.backend=precomputed", f"judge.scores_path={scores}"]
    return ["--config", str(ROOT / "jobs/configs/tiny.yaml"), *[a for s in sets for a in ("--set", s)]]


def _cfg(run: Path, world: Path, emb: Path | None = None) -> Config:
    return load_config(ROOT / "jobs/configs/tiny.yaml", _argv(run, world, emb)[3::2])


def _stage_files(run: Path) -> dict[str, str]:
    """SHA-256 of every stage output (Parquet) and of the official hard-negative JSON, by relative path."""
    mining = run / "mining"
    files = [*mining.rglob("*.parquet"), mining / "sample/hard_negatives.json"]
    return {str(f.relative_to(mining)): file_sha256(f) for f in files}


def test_mining_that_fills_its_disk_stops_in_one_line_and_resumes_to_the_clean_output(
    local_ray, tmp_path, capfd
):
    """Model-free mining (planted embeddings, oracle judge scores) on the synthetic world: a clean run
    on the ordinary disk, then the same run on a 4 MB tmpfs left with 36 KB free after retrieve, so the
    judge stage (its Ray tasks) meets the full disk."""
    world = tmp_path / "in"
    make_world(world / "world", seed=0)
    clean, emb, scores = tmp_path / "clean", tmp_path / "emb.parquet", tmp_path / "scores.parquet"
    pipeline.run_mining(_cfg(clean, world), ("ingest",))  # the ids, for the planted embeddings
    pq.write_table(planted_embeddings(clean / "mining/ingest").select(["id", "embedding"]), emb)
    pipeline.run_mining(_cfg(clean, world, emb), ("retrieve",))  # the requests, for the oracle's scores
    retrieved = sorted((clean / "mining/retrieve").glob("*.parquet"))
    write_oracle_scores(retrieved, clean / "mining/ingest", world / "world/world.json", scores)
    pipeline.main(_argv(clean, world, emb, scores))

    with small_disk(tmp_path / "fs", "4m") as disk:
        argv = _argv(disk / "run", world, emb, scores)
        pipeline.run_mining(_cfg(disk / "run", world, emb), ("retrieve",))
        ballast = fill(disk, 36 * 1024)
        # The real command in its own process, for its whole console (Ray prints the errors of tasks
        # whose results nobody took when the process ends); it joins this session's Ray, as a job
        # submitted to a cluster does.
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address,
        }
        job = subprocess.run(
            [sys.executable, "-m", "unime_ray.cli", "mine", *argv], capture_output=True, text=True, env=env
        )
        mining = disk / "run/mining"
        assert job.returncode == 1, job.stdout + job.stderr
        assert "[mine] judge: started" in job.stdout
        message = job.stderr.strip()
        assert message.startswith(f"[mine] stopped: {mining}/judge/"), job.stderr
        assert "\n" not in message  # one line, nothing else: no traceback, no task's error printed by Ray
        assert "no space left on the device writing it: it needed about " in message
        assert "bytes are free there" in message
        # Only whole files: no temporary file left, every Parquet file reads, judge not marked done.
        assert not [p for p in mining.rglob("*") if p.name.endswith(".tmp")]
        for f in mining.rglob("*.parquet"):
            pq.read_table(f)
        assert not (mining / "judge/_SUCCESS.json").exists()

        ballast.unlink()
        pipeline.main(argv)
        assert "[mine] retrieve: done earlier, skipped" in capfd.readouterr().out
        assert _stage_files(disk / "run") == _stage_files(clean)


def test_training_that_fills_its_disk_stops_in_one_line_and_reruns_without_the_partial_checkpoint(
    local_ray, tmp_path
):
    """The embedder's training on a tmpfs left with 200 KB: Ray Train's copy of the first checkpoint
    meets the full disk inside a worker. The command stops with one line naming the run folder; the
    partial checkpoint folder left was never registered, so once space is freed the rerun starts from
    step 0 (not from it) and finishes with a whole checkpoint."""
    clean = tmp_path / "clean"
    overrides = mine_with_oracle(ROOT / "jobs/configs/tiny.yaml", clean)
    hard = clean / "mining/sample/hard_negatives.parquet"
    with small_disk(tmp_path / "fs", "8m") as disk:
        run = disk / "run"
        settings = [o for o in overrides if not o.startswith("run.output_dir=")] + [
            f"run.output_dir={run}",
            f"train.data_path={hard}",
            "train.steps=4",
            "train.checkpoint_every=2",
            "train.max_failures=0",  # Ray Train would retry the full disk (and leave a folder) per attempt
        ]
        argv = ["train-embed", "--config", str(ROOT / "jobs/configs/tiny.yaml")]
        argv += [x for s in settings for x in ("--set", s)]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address,
        }
        ballast = fill(disk, 200 * 1024)
        job = subprocess.run(
            [sys.executable, "-m", "unime_ray.cli", *argv], capture_output=True, text=True, env=env
        )
        assert job.returncode == 1, job.stdout + job.stderr
        message = job.stderr.strip()
        assert message.startswith(f"[train-embed] stopped: {run}: no space left on the device ("), job.stderr
        assert "\n" not in message and "No space left on device)" in message  # the one line that matters
        partials = sorted(str(p) for p in (run / "ray_train/train_embed").glob("checkpoint_*"))
        assert partials

        ballast.unlink()
        job = subprocess.run(
            [sys.executable, "-m", "unime_ray.cli", *argv], capture_output=True, text=True, env=env
        )
        assert job.returncode == 0, job.stdout + job.stderr
        final = json.loads((run / "train_embed/final_rank0.json").read_text())
        assert (final["step"], final["resumed_from"]) == (4, 0)
        summary = json.loads(job.stdout.strip().splitlines()[-1])
        assert not any(summary["weights"].startswith(p) for p in partials)
        assert (Path(summary["weights"]) / "adapter_model.safetensors").is_file()
