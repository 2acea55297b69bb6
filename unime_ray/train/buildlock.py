"""Stale build locks of torch's JIT extensions, which DeepSpeed's CPU ops load through.

`torch.utils.cpp_extension.load` takes `<build folder>/lock` (a file created exclusively, naming no owner)
around every load of an op, even when nothing needs building, and every other process waits while the
file exists. A training worker SIGKILLed inside that window (a node's OOM killer, a preemption, the chaos
bench) leaves the file behind, and every later training on that machine hangs in DeepSpeed's start-up,
with no error. So each worker removes, before it starts DeepSpeed, the locks no process can still hold:
older than `STALE_S` (a load that builds nothing holds its lock for about a second) and with no running
process working in the build folder (torch runs ninja, and ninja the compiler, inside it).

On a home folder shared by several nodes, a build running on another node for longer than `STALE_S` is
not seen from here; set TORCH_EXTENSIONS_DIR to a node-local folder there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STALE_S = 120.0


def extensions_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else torch's default root."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _busy_folders() -> set[Path]:
    """The working folders of the running processes (those this process may read)."""
    folders = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                folders.add(Path(os.readlink(f"/proc/{entry.name}/cwd")))
            except OSError:  # exited, or not ours to read
                continue
    return folders


def clear_stale_build_locks(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the build locks under `root` (default: `extensions_root()`) that are older than `STALE_S`
    and whose build folder no running process works in; returns the locks removed."""
    root = extensions_root() if root is None else root
    now = time.time() if now is None else now
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    old = [lock for lock in locks if _age(lock, now) > STALE_S]
    if not old:
        return []
    busy = _busy_folders()
    removed = []
    for lock in old:
        folder = lock.parent
        if any(f == folder or folder in f.parents for f in busy):
            continue
        try:
            lock.unlink()
            removed.append(lock)
        except FileNotFoundError:  # another worker removed it first
            continue
    return removed


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
