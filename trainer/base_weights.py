"""Frozen base weights stored in a smaller format (`model.weight_dtype`) and computed in the training precision.

Each frozen Linear and Conv2d layer keeps its weight in the storage format (bf16, fp16, fp8) and upcasts it
for its own matmul only, forward and backward: the full-precision copy of one layer lives for one operation.

Not diffusers' `enable_layerwise_casting`: it is made for inference (it casts a module's weights in place
before its forward and back after), and a training step's backward needs the weights again after that. Not
a bare `unet.to(torch.float8_e4m3fn)` under autocast (kohya's `--fp8_base`): autograd would keep each
layer's upcast copy for the backward pass, so the full-precision weights would be held until the step ends.
Here the autograd function saves the stored weight and upcasts it once more in backward.

The adapters (peft's layers wrap these base layers) add their output to the base layer's: bypass form,
never merged into the stored weight, so the adapters train at full precision on a coarse base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
           "fp8_e5m2": torch.float8_e5m2}
# Small layers every step goes through first or last: kept in the training precision (as ComfyUI and
# OneTrainer keep them), they cost little memory and carry most of fp8's error when stored coarsely.
KEEP = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj", "text_projection")


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype), None, None, None


class _UpcastConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype, ctx.shape = dtype, x.dtype, x.shape
        ctx.conv = stride, padding, dilation, groups
        return F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(ctx.shape, weight.to(ctx.dtype), grad.to(ctx.dtype), *ctx.conv)
        return gx.to(ctx.x_dtype), None, None, None, None, None, None, None


class StoredLinear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in another format than it is computed in."""

    compute_dtype = torch.float32

    def forward(self, x):
        return _UpcastLinear.apply(x, self.weight, self.bias, self.compute_dtype)


class StoredConv2d(torch.nn.Conv2d):
    compute_dtype = torch.float32

    def forward(self, x):
        return _UpcastConv2d.apply(x, self.weight, self.bias, self.compute_dtype, self.stride, self.padding,
                                   self.dilation, self.groups)


def _frozen_base_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_parts = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            adapter_parts.update(id(x) for x in m.modules() if x is not base)
            if any(getattr(m, "use_dora", {}).values()) and isinstance(base, torch.nn.Conv2d):
                adapter_parts.add(id(base))  # peft's DoRA adds to a conv's weight as it is (fp8 takes no sums)
    for name, m in model.named_modules():
        if id(m) in adapter_parts or any(k in name.split(".") or name.startswith(k) for k in KEEP):
            continue
        if type(m) is torch.nn.Linear or (type(m) is torch.nn.Conv2d and m.padding_mode == "zeros"):
            if not m.weight.requires_grad:
                yield name, m


def store_weights(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> tuple[int, int]:
    """Store the frozen Linear/Conv2d weights of `model` (adapters already added) as `storage`, computed in
    `compute`; returns (layers stored, bytes saved). A layer whose weights exceed the format's range stays."""
    layers = saved = 0
    limit = torch.finfo(storage).max
    for _, m in list(_frozen_base_layers(model)):
        w = m.weight.data
        if not w.is_meta and w.abs().max().item() > limit:  # meta: a benchmark's weights without numbers
            continue
        m.weight = torch.nn.Parameter(w.to(storage), requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(m.bias.data.to(compute), requires_grad=False)
        m.__class__ = StoredLinear if isinstance(m, torch.nn.Linear) else StoredConv2d
        m.compute_dtype = compute
        layers += 1
        saved += w.numel() * (w.element_size() - m.weight.element_size())
    return layers, saved
