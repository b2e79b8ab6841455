"""`train.offload=blocks`: the UNet's blocks wait in (pinned) CPU memory and come to the GPU just before they run.

The blocks are the gradient-checkpointing units (trainer/checkpointing.py). Each time one begins to run,
in the forward pass or recomputed in backward, the offloader makes sure its frozen weights are on the
device, starts copying the block expected next on a copy stream (so the copy overlaps this block's
compute), and lets go of every other block's device copy. The next block is learned from the order seen:
forward and backward (recomputation) each keep their own "what came after this block" table, so the first
step copies without overlap and every later one overlaps. The frozen weights never change, so letting go
of a device copy is dropping it: the CPU copy stays the weight. Adapter weights (trainable) stay on the
device all the time, like every layer outside the blocks (the UNet's small first and last layers).

`keep` blocks (the first in the UNet's order) stay on the device for good: fewer copies, more memory.
On the CPU (tests), "the device" is the CPU too and a copy is a clone, so the schedule runs the same.
"""
from __future__ import annotations

import torch


class BlockOffloader:
    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, keep: int = 0, record: bool = False):
        self.blocks, self.device = blocks, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.keep = set(range(min(keep, len(blocks))))
        self.home: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        for block in blocks:
            frozen = [p for p in block.parameters() if not p.requires_grad]
            homes = []
            for p in frozen:
                cpu = p.data.to("cpu")
                if self.cuda:
                    cpu = cpu.pin_memory()
                p.data = cpu
                homes.append((p, cpu))
            self.home.append(homes)
        self.loading: dict[int, object] = {}  # block → CUDA event of its copy (None on the CPU)
        self.resident: set[int] = set()
        self.after = ({}, {})  # forward, backward: block → the block that ran next
        self.last = (None, None)  # (block, in backward)
        self.log: list[tuple[str, int]] | None = [] if record else None
        for i in self.keep:
            self._copy(i)

    def bytes_on_host(self) -> int:
        return sum(cpu.numel() * cpu.element_size() for i, homes in enumerate(self.home) if i not in self.keep
                   for _, cpu in homes)

    def _copy(self, i: int, ahead: bool = False) -> None:
        if i in self.resident or i in self.loading:
            return
        if self.log is not None:
            self.log.append(("prefetch" if ahead else "load", i))
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for p, cpu in self.home[i]:
                    p.data = cpu.to(self.device, non_blocking=True)
            self.loading[i] = self.stream.record_event()
        else:
            for p, cpu in self.home[i]:
                p.data = cpu.clone()
            self.loading[i] = None

    def _ready(self, i: int) -> None:
        self._copy(i)
        event = self.loading.pop(i, None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for p, _ in self.home[i]:
                p.data.record_stream(current)  # the copy stream's memory is in use on this stream now
        self.resident.add(i)

    def _drop(self, i: int) -> None:
        if self.log is not None:
            self.log.append(("drop", i))
        for p, cpu in self.home[i]:
            p.data = cpu
        self.resident.discard(i)
        self.loading.pop(i, None)

    def enter(self, i: int) -> None:
        """Block `i` begins to run (forward, or recomputed in backward)."""
        backward = torch._C._current_graph_task_id() != -1
        last, was_backward = self.last
        if last is not None and was_backward == backward and last != i:
            self.after[backward][last] = i
        self.last = (i, backward)
        self._ready(i)
        if self.log is not None:
            self.log.append(("run", i))
        upcoming = self.after[backward].get(i)
        for j in list(self.resident | set(self.loading)):
            if j != i and j != upcoming and j not in self.keep:
                self._drop(j)
        if upcoming is not None:
            self._copy(upcoming, ahead=True)

    def new_pass(self) -> None:
        """The UNet is called again: what ran last in the call before does not precede what runs first now."""
        self.last = (None, None)

    def on_device_now(self) -> list[int]:
        return sorted(self.resident | set(self.loading))


def move_except(module: torch.nn.Module, device, blocks: list[torch.nn.Module]) -> None:
    """Move `module` to `device`, except the frozen weights of `blocks` (the offloader places those)."""
    skip = {id(p) for b in blocks for p in b.parameters() if not p.requires_grad}
    for p in module.parameters():
        if id(p) not in skip:
            p.data = p.data.to(device)
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)
