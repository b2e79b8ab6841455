"""The run folder: the one source of truth about a run, read by the CLI, the app and resume.

<workspace>/runs/<name>/ holds config.yaml, metrics.jsonl, status.json, samples/, checkpoints/
and the final <name>.safetensors, and run.lock while a process trains it (run_lock.py). Files others
read are written atomically; a write that fails leaves no temporary file behind.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import LoraLabError

STATES = ("queued", "running", "completed", "stopped", "failed", "interrupted")
DISK_FULL = "The disk is full."
DISK_FULL_ADVICE = ("Free some space (old runs, exports, the cache folder), then resume: the last complete "
                    "checkpoint is intact.")
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def safe_name(name: str) -> str:
    """A run or file name that is safe in any file system and URL."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip()).strip(".-")
    return cleaned[:80] or "lora"


def disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc`, raised by whatever library, comes from a full disk (or a used-up quota).

    An errno or a message anywhere in the chain says so; torch.save says only 'file write failed', so a
    failed write to `where` while its disk has almost no space left counts too. Ask before removing
    the half-written file: its space would make the disk look fine again.
    """
    e, seen = exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in _FULL_ERRNOS or "No space left" in str(e) or "quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if where is None:
        return False
    where = Path(where)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return False
    return usage.free < min(4 << 20, usage.total // 100)


def _remove(path: Path) -> None:
    if Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            Path(path).unlink()


@contextmanager
def removed_on_failure(where: Path, *temps: Path):
    """A write that fails leaves none of its `temps` behind, and one that failed for a full disk says so
    as OSError(ENOSPC), whichever library wrote."""
    try:
        yield
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full(e, where)  # before removing frees the space
        for tmp in temps:
            _remove(tmp)
        if full and getattr(e, "errno", None) not in _FULL_ERRNOS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from e
        raise


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    text = json.dumps(data, indent=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with removed_on_failure(path.parent, tmp):
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    except OSError as e:
        if not disk_full(e) or not path.exists():
            raise
        # A full disk has no room for a second copy, but the file's own blocks can take the new text (status.json
        # is far smaller than one block): this is how a run on a full disk still says 'failed'. Not atomic: a reader
        # in that instant sees part of it, which read_json takes as unreadable for that one look.
        with open(path, "r+", encoding="utf-8") as f:
            f.write(text)
            f.truncate()


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.yaml")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_dir = property(lambda self: self.path / "samples")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    log_path = property(lambda self: self.path / "log.txt")

    def lora_path(self, name: str | None = None) -> Path:
        return self.path / f"{safe_name(name or self.name)}.safetensors"

    def status(self) -> dict:
        return read_json(self.status_path, {}) or {}

    def set_status(self, state: str, **extra) -> dict:
        assert state in STATES, state
        data = {**self.status(), **extra, "state": state, "updated": time.time()}
        if state not in ("failed", "interrupted"):
            data.pop("error", None)
            data.pop("advice", None)
        write_json_atomic(self.status_path, data)
        return data

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        """The training loss rows (one per step): {step, loss, lr, time}."""
        return [r for r in self.all_metrics() if "loss" in r]

    def validation(self) -> list[dict]:
        """The validation rows: {step, val_loss, val_on, time}."""
        return [r for r in self.all_metrics() if "val_loss" in r]

    def all_metrics(self) -> list[dict]:
        """Every row of metrics.jsonl: training rows and validation rows, in the order written."""
        rows = []
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a line cut short by a crash
                        pass
        except OSError:
            pass
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows past a checkpoint, so a resumed run writes one continuous curve."""
        rows = [r for r in self.all_metrics() if r.get("step", 0) <= after_step]
        tmp = self.metrics_path.with_name(".metrics.tmp")
        with removed_on_failure(self.path, tmp):
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, self.metrics_path)

    def log(self, line: str) -> None:
        """Best effort: a log line lost (a full disk) must not end a run, nor hide why it failed."""
        with suppress(OSError), open(self.log_path, "a", encoding="utf-8") as f:
            f.write(time.strftime("%H:%M:%S ") + line + "\n")

    def samples(self) -> list[Path]:
        return sorted(self.samples_dir.glob("*.png")) if self.samples_dir.exists() else []


def runs_root(workspace: Path) -> Path:
    return Path(workspace) / "runs"


def new_run(workspace: Path, name: str) -> RunDir:
    root = runs_root(workspace)
    root.mkdir(parents=True, exist_ok=True)
    base = safe_name(name)
    path, n = root / base, 2
    while path.exists():
        path, n = root / f"{base}-{n}", n + 1
    path.mkdir()
    (path / "samples").mkdir()
    (path / "checkpoints").mkdir()
    return RunDir(path)


def open_run(path: Path) -> RunDir:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise LoraLabError(f"{path} is not a run folder (no config.yaml).",
                           "Give a folder under <workspace>/runs/.")
    return RunDir(path)


def list_runs(workspace: Path) -> list[RunDir]:
    root = runs_root(workspace)
    if not root.exists():
        return []
    runs = [RunDir(p) for p in root.iterdir() if (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: r.status().get("started", r.path.stat().st_mtime), reverse=True)


def delete_run(run: RunDir) -> None:
    shutil.rmtree(run.path)
