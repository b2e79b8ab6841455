"""How a running job talks to whoever watches it (CLI progress bar, the app), and takes commands."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Event:
    """kind: status | log | step | sample | checkpoint | done. `data` is plain JSON-able values."""
    kind: str
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


Callback = Callable[[Event], None]


class Control:
    """Commands for a running job, checked once per step by the training thread (never blocking it)."""

    def __init__(self):
        self.stop = threading.Event()
        self.save_now = threading.Event()
        self.sample_now = threading.Event()

    @staticmethod
    def take(flag: threading.Event) -> bool:
        if flag.is_set():
            flag.clear()
            return True
        return False


COMMANDS = {"stop": "stop", "save": "save_now", "sample": "sample_now"}


class StdinControl(Control):
    """Commands as lines on stdin (`stop`, `save`, `sample`), for a job running in its own process.

    The app starts each run as `python -m trainer resume RUN --stdin-commands` and writes these
    lines to the pipe. The end of stdin (the app closed, crashed or was killed) means stop: the run
    saves a checkpoint and ends as 'stopped', so a restarted app can resume it.
    """

    def __init__(self, stream=None):
        super().__init__()
        import sys

        self.stream = stream or sys.stdin
        threading.Thread(target=self._read, name="stdin-commands", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.stream:
                flag = COMMANDS.get(line.strip().lower())
                if flag:
                    getattr(self, flag).set()
        except (OSError, ValueError):
            pass
        self.stop.set()
