"""Number formats: which one a device computes fast, and what `train.mixed_precision` resolves to."""
from __future__ import annotations

import torch

from .errors import LoraLabError

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # accelerate's names


def for_capability(major: int) -> str:
    """bf16 from Ampere (compute capability 8) on, fp16 on Volta/Turing tensor cores (7), and fp32 on
    older cards, whose half precision maths runs slower than their fp32."""
    return "bf16" if major >= 8 else "fp16" if major == 7 else "fp32"


def native(device: torch.device) -> str:
    """The fastest format `device` computes well. Not `torch.cuda.is_bf16_supported()`: it says yes to
    any CUDA card, by emulation, which on a Turing card runs several times slower than fp16."""
    if device.type != "cuda":
        return "fp32"
    return for_capability(torch.cuda.get_device_capability(device)[0])


def mixed_precision(setting: str, device: torch.device) -> str:
    if setting == "auto":
        return native(device)
    if setting == "fp16" and device.type == "cpu":
        raise LoraLabError("train.mixed_precision fp16 needs a GPU.", "Use bf16 or fp32 on the CPU.")
    return setting
