"""Training jobs that live in the server, not in a page: one at a time per device, in a thread.

The app calls `JobManager`; a refreshed or second browser tab asks it (and the run folder) for the
state, so it re-attaches to a running job and its full history. The training thread only stores
the latest event here; it never waits for a reader.
"""
from __future__ import annotations

import os
import threading
import time
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
    """Runs left 'running' by a process that is gone (app restart, crash) become 'interrupted'."""
    names = []
    for run in list_runs(workspace):
        st = run.status()
        if st.get("state") == "running" and (st.get("pid") == os.getpid() or not _pid_alive(st.get("pid"))):
            run.set_status("interrupted", error="The app stopped while this run was going.",
                           advice="Resume it to continue from its last checkpoint.")
            names.append(run.name)
    return names


class JobManager:
    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.control = Control()
        self.run: RunDir | None = None
        self.latest: dict = {}
        self.error: str | None = None
        mark_interrupted(self.workspace)

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _on_event(self, e: Event) -> None:
        if e.kind == "step":
            self.latest = dict(e.data)
        elif e.kind == "status":
            self.latest = {**self.latest, "state": e.data.get("state"), "phase": e.data.get("message", "")}

    def _launch(self, cfg: Config, run: RunDir | None, workspace: Path | None = None) -> RunDir:
        from .loop import run_job
        from .runs import new_run

        with self.lock:
            if self.busy:
                raise LoraLabError(f"A training run is already going ({self.run.name})."
                                   if workspace is None or workspace in self.run.path.parents else
                                   "Someone else's training run is using the device.",
                                   "Wait for it to finish, or stop it first: one run uses the device at a time.")
            self.control = Control()
            self.latest, self.error = {}, None
            if run is None:
                run = new_run(workspace or self.workspace, cfg.name)
                cfg.write(run.config_path)
                run.set_status("running", step=0, total_steps=cfg.train.steps, started=time.time(), pid=os.getpid())
            else:
                run.set_status("running", pid=os.getpid())
            self.run = run

            def work():
                try:  # a given run folder continues from its last checkpoint, if it has one
                    run_job(cfg, run.path.parent.parent, self._on_event, self.control, run=run)
                except LoraLabError as e:
                    self.error = str(e)
                except Exception as e:  # the run folder already says failed, with the reason
                    self.error = f"{type(e).__name__}: {e}"

            self.thread = threading.Thread(target=work, name=f"train-{run.name}", daemon=True)
            self.thread.start()
            return run

    def start(self, cfg: Config, workspace: Path | None = None) -> RunDir:
        return self._launch(cfg, None, workspace)

    def resume(self, run_path: Path) -> RunDir:
        from .config import load

        run = open_run(run_path)
        state = run.status().get("state")
        if state == "completed":
            raise LoraLabError(f"{run.name} has already completed.", "Start a new run to train more.")
        return self._launch(load(run.config_path), run)

    def stop(self) -> None:
        self.control.stop.set()

    def save_now(self) -> None:
        self.control.save_now.set()

    def sample_now(self) -> None:
        self.control.sample_now.set()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread:
            self.thread.join(timeout)
