"""One job per run folder: the lock every command that writes into `run.output_dir` takes first.

`RunLock(run_dir, command)` is a context manager. The lock is the file `<run_dir>/_LOCK`, created
atomically: its full contents (host, pid, process start, start time, command) are written to a private
file which is then hard-linked to `_LOCK`; a link fails when the name exists, on local disks and on
NFS-like shared filesystems alike, where fcntl/flock locks may not reach across nodes. A second job on
the same folder is refused at once (`RunLockedError`, naming the holder). While held, a daemon thread
refreshes the file's mtime every `HEARTBEAT_S` seconds; the lock is removed on normal exit and on any
exception (Ctrl-C included).

A lock left behind (the holder was SIGKILLed, its node lost) is stale, and taken over with a message:
- on the holder's own host, when its pid is gone or now belongs to a process started at another time;
- from another host, where the pid cannot be checked, when its heartbeat is older than `STALE_S`
  seconds, measured against a file this job has just written there (the filesystem's clock, not this
  host's, so clock skew between nodes does not matter).
Breaking a stale lock happens under a short-lived guard file (`_LOCK.break`, created the same way), so
two jobs that find the same stale lock cannot both take it."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "_LOCK"
HEARTBEAT_S = 10.0  # the holder refreshes the lock's mtime this often
STALE_S = 12 * HEARTBEAT_S  # a lock from another host not refreshed for this long is stale


class RunLockedError(RuntimeError):
    """The run folder is held by another live job."""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """State and start time (clock ticks since boot) of process `pid`, /proc/<pid>/stat fields 3 and
    22: the start time tells a pid's owner from a later process given the same pid. None where /proc
    does not exist (or the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _alive(holder: dict) -> bool:
    """Whether the holder's process (on this host) still runs: its pid exists, is not a zombie (killed,
    not yet reaped) and, where the start time can be read, was started when the holder was."""
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user has this pid: alive
    stat = _proc_stat(holder["pid"])
    if stat is None:
        return True
    state, start = stat
    return state != "Z" and holder.get("proc_start") in (None, start)


def describe(holder: dict) -> str:
    return (
        f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}, "
        f"command `{holder['command']}`"
    )


def _link_exclusive(src: Path, dst: Path) -> bool:
    """Give `dst` the contents of `src` if no `dst` exists, atomically; False when it exists."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False


def _read(path: Path) -> tuple[dict, float] | None:
    """The lock's holder record and mtime; None when it is gone. A lock whose contents cannot be read
    (not written by this module) counts as an unknown holder on an unknown host."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text), mtime
    except ValueError:
        return {"host": "?", "pid": -1, "started": "?", "command": "?", "token": None}, mtime


class RunLock:
    """Exclusive use of a run folder by one job (see the module's docstring). Re-entrant within one
    process: a nested `RunLock` on a folder this process already holds is a no-op."""

    _held: set[Path] = set()

    def __init__(self, run_dir: str | Path, command: str) -> None:
        self.dir = Path(run_dir).resolve()
        self.path = self.dir / LOCK_NAME
        self.command = command
        self.token = uuid.uuid4().hex
        self.message = ""  # what acquiring did when it took over a stale lock
        self._stop = threading.Event()
        self._nested = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "proc_start": (_proc_stat(os.getpid()) or (None, None))[1],
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": self.command,
            "token": self.token,
        }

    def _stale_reason(self, holder: dict, mtime: float, fs_now: float) -> str | None:
        if holder["host"] == socket.gethostname():
            return None if _alive(holder) else "its process is gone"
        age = fs_now - mtime
        return f"no heartbeat for {age:.0f} s (stale after {STALE_S:.0f} s)" if age > STALE_S else None

    def _break(self, mine: Path, holder: dict) -> bool:
        """Remove the stale lock of `holder` under the guard; False if another job holds the guard."""
        guard = self.path.with_name(LOCK_NAME + ".break")
        if not _link_exclusive(mine, guard):
            with contextlib.suppress(FileNotFoundError):
                if mine.stat().st_mtime - guard.stat().st_mtime > STALE_S:
                    guard.unlink()  # a breaker died within its few milliseconds: let the next try win
            return False
        try:
            current = _read(self.path)
            if current is not None and current[0].get("token") == holder.get("token"):
                self.path.unlink()
            return True
        finally:
            guard.unlink()

    def acquire(self) -> None:
        if self.dir in RunLock._held:
            self._nested = True
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        mine = self.dir / f".{LOCK_NAME}.{self.token}"
        mine.write_text(json.dumps(self._record()) + "\n")
        try:
            self._acquire_with(mine)
        finally:
            mine.unlink()
        RunLock._held.add(self.dir)
        threading.Thread(target=self._beat, name=f"runlock {self.dir}", daemon=True).start()

    def _acquire_with(self, mine: Path) -> None:
        for _ in range(5):  # a lock can vanish or be broken between the tries: retry a few times
            if _link_exclusive(mine, self.path):
                return
            found = _read(self.path)
            if found is None:
                continue
            holder, mtime = found
            why = self._stale_reason(holder, mtime, fs_now=mine.stat().st_mtime)
            if why is None:
                raise RunLockedError(
                    f"run folder {self.dir} is in use by another job ({describe(holder)}); "
                    f"wait for it to finish or stop it (lock file {self.path})"
                )
            if self._break(mine, holder):
                self.message = f"took over the stale lock of {self.dir}: {why} ({describe(holder)})"
            else:
                time.sleep(0.2)  # another job is breaking it: see who holds it after
        raise RunLockedError(f"run folder {self.dir}: could not take its lock {self.path}; try again")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._nested:
            return
        self._stop.set()
        RunLock._held.discard(self.dir)
        found = _read(self.path)
        if found is not None and found[0].get("token") == self.token:
            self.path.unlink()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def command_lock(run_dir: str | Path, name: str) -> Iterator[RunLock]:
    """`RunLock` for the CLI command `name`: a refusal stops it with one line (no traceback), and so
    does a run folder that cannot be written (the preflight's message) and a full disk met while the
    command runs (the file and the bytes, `io.disk_full`); a takeover of a stale lock is said on stderr.
    The command recorded is this process's command line."""
    from unime_ray.io import disk_full
    from unime_ray.preflight import PreflightError, check_output

    try:
        check_output(str(run_dir))
        lock = RunLock(run_dir, " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        lock.acquire()
    except RunLockedError as e:
        raise SystemExit(f"[{name}] refused: {e}") from None
    except PreflightError as e:
        raise SystemExit(f"[{name}] stopped: {e}") from None
    if lock.message:
        print(f"[{name}] {lock.message}", file=sys.stderr, flush=True)
    try:
        yield lock
    except Exception as e:
        full = disk_full(e, run_dir)
        if full is None:
            raise
        raise SystemExit(f"[{name}] stopped: {full}") from None
    finally:
        lock.release()
