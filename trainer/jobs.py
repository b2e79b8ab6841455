"""Training jobs that live in the server, not in a page: one run per device, the rest queued.

The app calls `JobManager`; a refreshed or second browser tab asks it (and the run folder) for the
state, so it re-attaches to a running job and its full history. Each device (GPU, or the CPU)
trains one run at a time. Every run trains in a process of its own
(`python -m trainer resume RUN --stdin-commands`): the web server and the training loop never
share an interpreter lock, so a browser watching the live page does not slow training, and a
crash of either side leaves the other standing. The job writes its progress to the run folder
(the app reads it when it likes; the job never waits for a reader) and takes stop/save/sample
as lines on its stdin. Further runs wait in one queue, in order, and can be cancelled.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import LoraLabError
from . import run_lock
from .runs import DISK_FULL, DISK_FULL_ADVICE, RunDir, delete_run, disk_full, list_runs, open_run


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def mark_interrupted(workspace: Path) -> list[str]:
    """Runs left running or queued by a process that is gone (app restart, crash) become 'interrupted'.

    Not one that a live process is training (another app on this workspace, a command line run): its lock says so.
    """
    names = []
    roots = [Path(workspace)] + [p for sub in ("users", "sessions") for p in (Path(workspace) / sub).glob("*")]
    for root in roots:
        for run in list_runs(root):
            st = run.status()
            if st.get("state") in ("running", "queued") and (st.get("pid") == os.getpid()
                                                             or not _pid_alive(st.get("pid"))) \
                    and not run_lock.owner(run.path):
                run.set_status("interrupted", error="The app stopped while this run was going.",
                               advice="Resume it to continue from its last checkpoint.")
                names.append(run.name)
    return names


def default_devices() -> list[str]:
    if "torch" not in sys.modules and not _may_have_gpu():
        return ["auto"]  # spares the app a 3 s torch import on machines without a GPU
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["auto"]


def missing_devices(devices: list[str]) -> str | None:
    """Why `devices` (the app's --devices) can't all be trained on here, or None: said when the app starts, not
    when a user's first run fails."""
    if len(set(devices)) < len(devices):
        twice = next(d for d in devices if devices.count(d) > 1)
        return f"{twice} is named twice (each device trains one run at a time)"
    others = [d for d in devices if d not in ("cpu", "auto")]
    if not others:
        return None
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in others:
        try:
            dev = torch.device(d)
        except RuntimeError:
            return f"{d!r} is not a device name (use cuda:0, cuda:1, … or cpu)"
        if dev.type == "cuda" and (dev.index or 0) >= have:
            return f"{d} is not here: this machine has {have} CUDA GPU{'s' if have != 1 else ''} PyTorch can use"
        if dev.type == "mps" and not (torch.backends.mps.is_available()):
            return f"{d} is not here (no Apple GPU PyTorch can use)"
        if dev.type not in ("cuda", "mps", "cpu"):
            return f"{d} is not a device LoRA Lab trains on (use cuda:N, mps or cpu)"
    return None


def _may_have_gpu() -> bool:
    """A cheap look for an NVIDIA or AMD GPU driver, before paying for `import torch`."""
    import shutil

    return bool(shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists() or Path("/dev/kfd").exists()
                or os.environ.get("CUDA_VISIBLE_DEVICES"))


ROOT = Path(__file__).resolve().parent.parent  # where `python -m trainer` is found


def _same(a: RunDir, b: RunDir) -> bool:
    """One run folder, however spelled (`runs/dup`, `runs/../runs/dup`, through a symlink)."""
    return a.path == b.path or a.path.resolve() == b.path.resolve()
LIVE_KEYS = ("speed", "eta", "memory", "phase")


@dataclass
class Slot:
    """A run on a device, or waiting for one."""
    run: RunDir
    cfg: Config
    device: str | None = None
    thread: threading.Thread | None = None
    proc: subprocess.Popen | None = None
    pending: list[str] = field(default_factory=list)  # commands given before the process was up
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def latest(self) -> dict:
        """Speed, ETA, memory and phase, as the job last wrote them to its run folder."""
        st = self.run.status()
        return {k: st[k] for k in LIVE_KEYS if st.get(k) is not None}

    def send(self, command: str) -> bool:
        """Tell the job's process `stop`, `save` or `sample`; it acts after the current step."""
        with self.lock:
            proc = self.proc
            if proc is None and self.thread is not None:  # starting: said as soon as it is up
                self.pending.append(command)
                return True
        if proc is None or proc.poll() is not None or proc.stdin is None:
            return False
        try:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            return True
        except (OSError, ValueError):  # it has just ended
            return False


class JobManager:
    def __init__(self, workspace: Path, devices: list[str] | None = None):
        self.workspace = Path(workspace)
        self._devices = devices  # found on the first start: importing torch would slow the app's start
        self.lock = threading.RLock()
        self.active: dict[str, Slot] = {}   # device → its running slot
        self.queue: list[Slot] = []
        mark_interrupted(self.workspace)

    @property
    def devices(self) -> list[str]:
        if self._devices is None:
            self._devices = default_devices()
        return self._devices

    # --- what the app asks ---------------------------------------------------------------
    @property
    def busy(self) -> bool:
        with self.lock:
            return any(s.thread and s.thread.is_alive() for s in self.active.values())

    def slot_for(self, run: RunDir | None) -> Slot | None:
        if run is None:
            return None
        with self.lock:
            for s in [*self.active.values(), *self.queue]:
                if _same(s.run, run):
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
                if _same(s.run, run):
                    return n + 1
        return None

    def queue_length(self) -> int:
        return len(self.queue)

    # --- commands --------------------------------------------------------------------------
    def start(self, cfg: Config, workspace: Path | None = None) -> RunDir:
        from .data.sources import check_dataset
        from .runs import new_run

        check_dataset(cfg)  # a wrong column or an empty folder is said now, not left behind as a failed run
        with self.lock:
            run = new_run(workspace or self.workspace, cfg.name)
            try:
                cfg.write(run.config_path)
                run.set_status("queued", step=0, total_steps=cfg.train.steps, started=time.time(), pid=os.getpid())
            except OSError as e:
                delete_run(run)  # half made: no run to list
                if disk_full(e):
                    raise LoraLabError(DISK_FULL, "Free some space (old runs, exports, the cache folder), then "
                                                  "start again.") from e
                raise
            self._enqueue(Slot(run, cfg))
            return run

    def resume(self, run_path: Path) -> RunDir:
        from .config import load

        run = open_run(run_path)
        state = run.status().get("state")
        if state == "completed":
            raise LoraLabError(f"{run.name} has already completed.", "Start a new run to train more.")
        slot = self.slot_for(run)
        if slot and slot.thread and state not in ("running", "queued"):
            # The job has said it stopped, so a page shows it stopped, but its process is still ending
            # (the interpreter's teardown): give it those moments rather than refuse the Resume click.
            slot.thread.join(30)
        if self.slot_for(run):
            raise LoraLabError(f"{run.name} is already running or waiting.", "Watch it in the Train tab.")
        if who := run_lock.owner(run.path):  # another app on this workspace, or a command line run
            raise run_lock.busy_error(run.name, who)
        with self.lock:
            run.set_status("queued", pid=os.getpid(), speed=None, eta=None)  # the last session's speed is stale
            self._enqueue(Slot(run, load(run.config_path)))
        return run

    def cancel(self, run: RunDir) -> bool:
        """Take a waiting run out of the queue. One that never trained a step is removed (so cancelled
        starts do not pile up as 'stopped 0/N'); a resumed one is left stopped, to resume later."""
        from .checkpoint import latest_checkpoint
        from .runs import delete_run

        with self.lock:
            for s in self.queue:
                if _same(s.run, run):
                    self.queue.remove(s)
                    if not run.status().get("step") and latest_checkpoint(run.checkpoints_dir) is None:
                        delete_run(run)
                    else:
                        run.set_status("stopped", error=None)
                    return True
        return False

    def stop(self, run: RunDir) -> None:
        if not self.cancel(run) and (s := self.slot_for(run)):
            s.send("stop")

    def save_now(self, run: RunDir) -> None:
        if s := self.slot_for(run):
            s.send("save")

    def sample_now(self, run: RunDir) -> None:
        if s := self.slot_for(run):
            s.send("sample")

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
                with suppress(OSError):  # not even in place (a full disk): its process says how it went
                    slot.run.set_status("running", pid=os.getpid())
                slot.thread = threading.Thread(target=self._work, args=(slot,), name=f"train-{slot.run.name}",
                                               daemon=True)
                slot.thread.start()

    def _work(self, slot: Slot) -> None:
        # a given run folder continues from its last checkpoint, if it has one
        cmd = [sys.executable, "-m", "trainer", "resume", str(slot.run.path.resolve()), "--stdin-commands"]
        if slot.device and slot.device != "auto":
            cmd += ["--device", slot.device]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep), "PYTHONUNBUFFERED": "1"}
        # Its own process group: Ctrl+C in the app's terminal stops the app; the job then sees its stdin
        # close, saves a checkpoint and ends as 'stopped'.
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                 else {"start_new_session": True})
        try:
            with open(slot.run.path / "process.log", "a", encoding="utf-8") as out:
                with slot.lock:
                    slot.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                                 text=True, env=env, **group)
                for command in slot.pending:
                    slot.send(command)
                code = slot.proc.wait()
            who = run_lock.owner(slot.run.path)
            if who and who.get("pid") != slot.proc.pid:
                pass  # refused: another process took the run since resume() looked; the status is that one's
            elif slot.run.status().get("state") in ("running", "queued"):  # it died without saying why
                self._died(slot.run, code)
        except Exception as e:  # this thread must outlive anything: else the run shows 'running' with no process
            self._failed(slot, e)
        finally:
            with self.lock:
                self.active.pop(slot.device, None)
            self._dispatch()

    @staticmethod
    def _failed(slot: Slot, e: Exception) -> None:
        if disk_full(e, slot.run.path):
            error, advice = DISK_FULL, DISK_FULL_ADVICE
        elif slot.proc is None and isinstance(e, OSError):
            error = f"Could not start the training process: {e}"
            advice = "Check that the app's Python environment is intact (re-run the installer)."
        else:
            error = f"The job manager lost this run: {type(e).__name__}: {e}"
            advice = "Resume continues from the last checkpoint."
        with suppress(OSError):
            slot.run.set_status("failed", error=error, advice=advice)
        slot.run.log(f"FAILED: {error}")

    @staticmethod
    def _died(run: RunDir, code: int) -> None:
        if code < 0 and -code == getattr(signal, "SIGKILL", 9):
            error = "The training process was killed (signal 9), most often because the machine ran out of memory."
            advice = ("Lower train.batch_size or dataset.resolution, or close other programs; then resume: the last "
                      "checkpoint is intact.")
        else:
            error = f"The training process ended unexpectedly (exit code {code})."
            advice = "Its output is in process.log in the run folder. Resume continues from the last checkpoint."
        run.set_status("failed", error=error, advice=advice)
        run.log(f"FAILED: {error}")
