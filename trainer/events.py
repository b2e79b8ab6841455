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
