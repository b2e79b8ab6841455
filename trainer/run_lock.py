"""One process trains a run folder at a time, whatever path spelling, device or app reached it.

The training process holds `run.lock` in the run folder itself (so `runs/dup` and `runs/../runs/dup`
meet at one file): JSON naming its pid, host and process start time, the last so that a reused pid is
not mistaken for the owner. The file is created with O_EXCL, so of two processes only one gets it.
A lock whose process is gone (killed, machine restarted) is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import LoraLabError

LOCK = "run.lock"
WRITING_S = 10  # an empty lock younger than this is being written by its owner, not abandoned


def _me() -> dict:
    import psutil

    return {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}


def _read(path: Path) -> dict | None:
    """The lock's owner as written; {} when unreadable (half written); None when there is no lock."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(owner: dict) -> bool:
    import psutil

    if owner.get("host") != socket.gethostname():
        return True  # a process on another machine sharing the folder: we cannot look, so we trust it
    try:
        p = psutil.Process(int(owner["pid"]))
        return abs(p.create_time() - float(owner["started"])) < 1 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < WRITING_S
    except OSError:
        return False


def owner(run_path: Path) -> dict | None:
    """The live process training this run ({pid, host, started}), or None."""
    path = Path(run_path) / LOCK
    data = _read(path)
    if data is None:
        return None
    if not data:
        return {"pid": "?", "host": socket.gethostname()} if _young(path) else None
    return data if _alive(data) else None


def busy_error(name: str, who: dict) -> LoraLabError:
    fix = ("Wait for it to end, or stop it where it runs (Stop in the app that started it, Ctrl+C in its "
           "terminal); then resume: it continues from its last checkpoint.")
    if who.get("host") != socket.gethostname():
        fix += f" If that process no longer runs, delete {LOCK} in the run folder."
    return LoraLabError(f"{name} is already being trained by process {who.get('pid')} (on {who.get('host')}).", fix)


class RunLock:
    def __init__(self, path: Path, me: dict):
        self.path, self.me = path, me

    def release(self) -> None:
        """Remove the lock, if it is still ours (never one a later owner took over)."""
        try:
            if _read(self.path) == self.me:
                self.path.unlink()
        except OSError:
            pass  # left behind, it is stale once we exit, and the next trainer takes it over


def acquire(run_path: Path) -> RunLock:
    """Lock the run for this process, or raise LoraLabError naming the process that trains it."""
    path, me = Path(run_path) / LOCK, _me()
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if who := owner(run_path):
                raise busy_error(Path(run_path).name, who)
            _break_stale(path)
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
        except BaseException:
            path.unlink(missing_ok=True)  # ours, but empty: a full disk, most often
            raise
        return RunLock(path, me)
    raise LoraLabError(f"Could not lock {Path(run_path).name}: other processes keep taking and leaving it.",
                       "Try again in a moment.")


def _break_stale(path: Path) -> None:
    """Remove a lock whose owner is gone, so that a fresh one taken meanwhile by another process is never removed.

    Takers of one stale lock first race for a guard named after its owner; the winner looks again and removes
    the lock only if it is still that owner's: nobody else removes a dead owner's lock while the guard is held.
    """
    stale = _read(path)
    if stale is None:
        return
    guard = path.with_name(f".{LOCK}.{stale.get('pid')}-{stale.get('started')}.breaking")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        if not _young(guard):  # left by a taker killed in that instant
            guard.unlink(missing_ok=True)
        time.sleep(0.05)
        return
    try:
        if _read(path) == stale and not owner(path.parent):
            path.unlink()
    finally:
        guard.unlink(missing_ok=True)
