"""Peak accelerator memory of each phase of a run (caching, loading, training, sampling), as it happens.

CUDA's allocator keeps one peak; the meter resets it when a phase begins and notes it when the phase ends,
so each phase's figure is its own. A phase within another (samples during training) hands back to the outer
one after. On the CPU there is nothing to measure and every call does nothing.
"""
from __future__ import annotations

import platform
import statistics
from contextlib import contextmanager

import torch

from .memory_plan import spill_warning


class PhaseMeter:
    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.peaks: dict[str, int] = {}  # bytes allocated at most, per phase
        self.reserved: dict[str, int] = {}  # bytes the allocator held at most (what nvidia-smi shows, less the context)
        self.current: str | None = None
        self.step_seconds: list[float] = []

    def start(self, name: str | None) -> None:
        """`name` begins (None: nothing is measured until the next phase); the phase before keeps its peak."""
        self.note()
        self.current = name
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.cuda)

    def note(self) -> None:
        if self.cuda and self.current:
            peak = torch.cuda.max_memory_allocated(self.cuda)
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
            held = torch.cuda.max_memory_reserved(self.cuda)
            self.reserved[self.current] = max(self.reserved.get(self.current, 0), held)

    @contextmanager
    def during(self, name: str):
        outer = self.current
        self.start(name)
        try:
            yield
        finally:
            self.start(outer)

    def warning(self, seconds_per_step: float | None = None) -> str | None:
        """Says so when the card's memory is oversubscribed (NVIDIA's Windows driver then lends shared system
        memory), or when it is nearly full and steps have become several times slower than they were."""
        if not self.cuda:
            return None
        reserved = torch.cuda.memory_reserved(self.cuda)
        total = torch.cuda.get_device_properties(self.cuda).total_memory
        said = spill_warning(reserved, total, platform.system() == "Windows")
        if said or seconds_per_step is None:
            return said
        self.step_seconds.append(seconds_per_step)
        usual = statistics.median(self.step_seconds[:20])
        if len(self.step_seconds) > 20 and reserved > 0.95 * total and seconds_per_step > 4 * usual:
            return (f"Steps take {seconds_per_step:.1f} s, {seconds_per_step / usual:.0f}× the {usual:.2f} s they took at "
                    f"first, with the card's memory nearly full: it may be spilling into shared system memory. Stop, "
                    "and turn on a memory saving (Check settings says which fits).")
        return None
