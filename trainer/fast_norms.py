"""`train.fast_norms`: the UNet's GroupNorm and LayerNorm run in bf16 under bf16 autocast.

CUDA's autocast runs group_norm and layer_norm in fp32: each norm's input is cast up, and its fp32 output is
cast down again by every layer that reads it (three times before q, k and v), forward and backward: SD 1.5
launches about 330 such casts per forward, SDXL about 1,400 (tests/bench/bench_host_ops.py). PyTorch's own
bf16 norm kernels keep their statistics in fp32 (CUDA and CPU compute in the accumulate type, float), so the
only change is that the output is rounded to bf16 once, which the next convolution or matmul does anyway; the
SiLU after a GroupNorm then works on that rounded value, and the gradients of the layers reading a norm's output
are summed in bf16. Against fp32 gradients (tests/test_fused_lora.py, the tiny UNet, three seeds) that is
0.63-0.93 % off instead of autocast's 0.59 %: within bf16's own error, far below a batch's noise. Only for bf16:
fp16's range is too narrow to run norms in it. `train.fast_norms: false` keeps autocast's fp32 norms.
"""
from __future__ import annotations

import types

import torch


def _autocast_off(device: str):
    # A C++ guard: torch.autocast(enabled=False) costs ~7 µs of Python per call, this ~1 µs. torch.compile
    # cannot trace the guard (a graph break at every norm), so a compiled UNet gets torch.autocast.
    guard = getattr(torch._C, "_DisableAutocast", None)
    if guard is None or torch.compiler.is_compiling():
        return torch.autocast(device, enabled=False)
    return guard()


def _in_bf16(x: torch.Tensor) -> bool:
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


def _affine(module, dtype):
    w, b = module.weight, module.bias
    return (w if w is None or w.dtype == dtype else w.to(dtype)), (b if b is None or b.dtype == dtype else b.to(dtype))


def _group_norm(self, x: torch.Tensor) -> torch.Tensor:
    if not _in_bf16(x):
        return torch.nn.GroupNorm.forward(self, x)
    x = x.to(torch.bfloat16)
    w, b = _affine(self, x.dtype)
    with _autocast_off(x.device.type):  # torch.group_norm, not F.group_norm: the aten op, whatever wraps the functional
        return torch.group_norm(x, self.num_groups, w, b, self.eps, torch.backends.cudnn.enabled)


def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
    if not _in_bf16(x):
        return torch.nn.LayerNorm.forward(self, x)
    x = x.to(torch.bfloat16)
    w, b = _affine(self, x.dtype)
    with _autocast_off(x.device.type):
        return torch.layer_norm(x, self.normalized_shape, w, b, self.eps, torch.backends.cudnn.enabled)


def install(model: torch.nn.Module) -> int:
    """Give `model`'s GroupNorm and LayerNorm layers the bf16 forward; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.GroupNorm:
            m.forward = types.MethodType(_group_norm, m)
        elif type(m) is torch.nn.LayerNorm:
            m.forward = types.MethodType(_layer_norm, m)
        else:
            continue
        n += 1
    return n
