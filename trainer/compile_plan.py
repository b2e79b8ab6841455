"""`train.compile`: whether a run compiles its UNet, and how (one graph per bucket shape, a cache in the workspace).

Measured on an H200 (tests/bench/results/gpu/h200_compile_sd15.json): an SD 1.5 step went from 5.78 to 8.39
steps/s compiled, after a first step of 109 s. Each step then saves about 0.054 s, so compiling pays back
after about 2,000 steps: `auto` compiles runs of at least that many. Not on the CPU: inductor's CPU code left
the mid block's LoRA without gradients (tests/bench/check_compile.py), and a CPU run gains nothing from it.
"""
from __future__ import annotations

import os
from pathlib import Path

PAYS_AFTER_STEPS = 2000
COMPILING = "compiling (first step of each image size only: about 2 minutes on a GPU)"


def decide(cfg, device, offloaded: bool) -> tuple[bool, str]:
    """(compile?, the line for the log; empty when there is nothing to say)."""
    setting, steps = cfg.train.compile, cfg.train.steps
    if setting == "off":
        return False, ""
    if device.type != "cuda":
        return False, "train.compile: not used on the CPU (it is for GPUs)" if setting == "on" else ""
    if offloaded:
        return False, "train.compile: not used with train.offload=blocks (the blocks' weights move while it runs)"
    if setting == "on":
        return True, "train.compile: on"
    if steps >= PAYS_AFTER_STEPS:
        return True, f"train.compile auto: on ({steps} steps repay its first step, about 2 minutes)"
    return False, (f"train.compile auto: off ({steps} steps; compiling pays back from about {PAYS_AFTER_STEPS} "
                   "steps; train.compile=on compiles anyway)")


def compiled(unet, workspace: Path, shapes: int, backend: str = "inductor", mode: str | None = None):
    """The UNet compiled with one static graph per input shape (the buckets), PyTorch's compile cache kept in
    the workspace (a second run with the same model and sizes starts from it). Samples and the validation loss
    use the uncompiled module (the loop unwraps it): their shapes would each cost a compile of their own."""
    import torch

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(workspace) / "cache" / "compile"))
    limits = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in newer torch; room for every bucket
        if hasattr(limits, name):
            setattr(limits, name, max(getattr(limits, name), shapes + 2))
    return torch.compile(unet, dynamic=False, backend=backend, mode=mode)
