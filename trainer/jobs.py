"""Training jobs that live in the server, not in a page: one run per device, the rest queued.

The app calls `JobManager`; a refreshed or second browser tab asks it (and the run folder) for the
state, so it re-attaches to a running job and its full history. Each device (GPU, or the CPU)
trains one run at a time in its own thread; further runs wait in one queue, in order, and can
be cancelled while they wait. The training thread only stores its latest event here; it never
waits for a reader.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import LoraLabError
from .events import Control, Event
from .runs import RunDir, list_runs, open_run


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def mark_interrupted(workspace: Path) -> list[str]:
    """Runs left running or queued by a process that is gone (app restart, crash) become 'interrupted'."""
    names = []
    roots = [Path(workspace)] + [p for sub in ("users", "sessions") for p in (Path(workspace) / sub).glob("*")]
    for root in roots:
        for run in list_runs(root):
            st = run.status()
            if st.get("state") in ("running", "queued") and (st.get("pid") == os.getpid()
                                                             or not _pid_alive(st.get("pid"))):
                run.set_status("interrupted", error="The app stopped while this run was going.",
                               advice="Resume it to continue from its last checkpoint.")
                names.append(run.name)
    return names


def default_devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["auto"]


@dataclass
class Slot:
    """A run on a device, or waiting for one."""
    run: RunDir
    cfg: Config
    control: Control = field(default_factory=Control)
    latest: dict = field(default_factory=dict)
    device: str | None = None
    thread: threading.Thread | None = None
    error: str | None = None


class JobManager:
    def __init__(self, workspace: Path, devices: list[str] | None = None):
        self.workspace = Path(workspace)
        self.devices = devices or default_devices()
        self.lock = threading.RLock()
        self.active: dict[str, Slot] = {}   # device → its running slot
        self.queue: list[Slot] = []
        self.last: Slot | None = None       # the most recently started slot
        mark_interrupted(self.workspace)

    # --- what the app asks ---------------------------------------------------------------
    @property
    def busy(self) -> bool:
        with self.lock:
            return any(s.thread and s.thread.is_alive() for s in self.active.values())

    @property
    def run(self) -> RunDir | None:
        """The most recently started run (for a single user's live view)."""
        return self.last.run if self.last else None

    @property
    def latest(self) -> dict:
        return self.last.latest if self.last else {}

    def slot_for(self, run: RunDir | None) -> Slot | None:
        if run is None:
            return None
        with self.lock:
            for s in [*self.active.values(), *self.queue]:
                if s.run.path == run.path:
                    return s
        return None

    def runs_in(self, workspace: Path) -> list[Slot]:
        """Active and queued slots whose run lives in `workspace` (one user's own)."""
        with self.lock:
            return [s for s in [*self.active.values(), *self.queue] if Path(workspace) in s.run.path.parents]

    def position(self, run: RunDir) -> int | None:
        """1-based place in the queue, or None when not waiting."""
        with self.lock:
            for n, s in enumerate(self.queue):
                if s.run.path == run.path:
                    return n + 1
        return None

    def queue_length(self) -> int:
        return len(self.queue)

    # --- commands --------------------------------------------------------------------------
    def start(self, cfg: Config, workspace: Path | None = None) -> RunDir:
        from .runs import new_run

        with self.lock:
            run = new_run(workspace or self.workspace, cfg.name)
            cfg.write(run.config_path)
            run.set_status("queued", step=0, total_steps=cfg.train.steps, started=time.time(), pid=os.getpid())
            self._enqueue(Slot(run, cfg))
            return run

    def resume(self, run_path: Path) -> RunDir:
        from .config import load

        run = open_run(run_path)
        state = run.status().get("state")
        if state == "completed":
            raise LoraLabError(f"{run.name} has already completed.", "Start a new run to train more.")
        if self.slot_for(run):
            raise LoraLabError(f"{run.name} is already running or waiting.", "Watch it in the Train tab.")
        with self.lock:
            run.set_status("queued", pid=os.getpid())
            self._enqueue(Slot(run, load(run.config_path)))
        return run

    def cancel(self, run: RunDir) -> bool:
        """Take a waiting run out of the queue; it can be resumed later."""
        with self.lock:
            for s in self.queue:
                if s.run.path == run.path:
                    self.queue.remove(s)
                    run.set_status("stopped", error=None)
                    return True
        return False

    def stop(self, run: RunDir | None = None) -> None:
        s = self.slot_for(run) if run else self.last
        if s:
            if s in self.queue:
                self.cancel(s.run)
            else:
                s.control.stop.set()

    def save_now(self, run: RunDir | None = None) -> None:
        s = self.slot_for(run) if run else self.last
        if s:
            s.control.save_now.set()

    def sample_now(self, run: RunDir | None = None) -> None:
        s = self.slot_for(run) if run else self.last
        if s:
            s.control.sample_now.set()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until nothing runs or waits (for scripts and tests)."""
        deadline = None if timeout is None else time.time() + timeout
        while deadline is None or time.time() < deadline:
            with self.lock:
                threads = [s.thread for s in self.active.values() if s.thread]
                if not threads and not self.queue:
                    return
            for t in threads:
                t.join(0.2)

    # --- scheduling ------------------------------------------------------------------------
    def _enqueue(self, slot: Slot) -> None:
        self.queue.append(slot)
        self._dispatch()

    def _dispatch(self) -> None:
        with self.lock:
            for device in self.devices:
                if not self.queue:
                    return
                if device in self.active:
                    continue
                slot = self.queue.pop(0)
                slot.device = device
                if device != "auto":
                    slot.cfg.train.device = device
                self.active[device] = slot
                self.last = slot
                slot.run.set_status("running", pid=os.getpid())
                slot.thread = threading.Thread(target=self._work, args=(slot,), name=f"train-{slot.run.name}",
                                               daemon=True)
                slot.thread.start()

    def _work(self, slot: Slot) -> None:
        from .loop import run_job

        def on_event(e: Event) -> None:
            if e.kind == "step":
                slot.latest = dict(e.data)
            elif e.kind == "status":
                slot.latest = {**slot.latest, "state": e.data.get("state"), "phase": e.data.get("message", "")}

        try:  # a given run folder continues from its last checkpoint, if it has one
            run_job(slot.cfg, slot.run.path.parent.parent, on_event, slot.control, run=slot.run)
        except LoraLabError as e:
            slot.error = str(e)
        except Exception as e:  # the run folder already says failed, with the reason
            slot.error = f"{type(e).__name__}: {e}"
        finally:
            with self.lock:
                self.active.pop(slot.device, None)
            self._dispatch()
