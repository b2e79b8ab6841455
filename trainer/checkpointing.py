"""Gradient checkpointing at a chosen depth (`train.checkpoint_depth`), and the units it works in.

A unit is a part of the UNet whose activations are recomputed in backward instead of kept: at depth
`block` each ResNet block and each transformer block (what diffusers' `enable_gradient_checkpointing`
checkpoints), at depth `layer` each ResNet block and each attention and feed-forward of a transformer
block on its own (less memory while one is recomputed). The same units are what `offload=blocks`
moves between CPU and GPU memory: a unit's weights are needed only while it runs or is recomputed.

Our own wrapper rather than diffusers' flag: diffusers checkpoints at one depth only, and the offloader
must see each recomputation begin (a module's hooks do not run when torch.utils.checkpoint recomputes).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def units(unet: torch.nn.Module, depth: str) -> list[torch.nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    out = []
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D):
            out.append(m)
        elif isinstance(m, BasicTransformerBlock):
            if depth == "layer":
                out += [c for c in (m.attn1, m.attn2, m.ff) if c is not None]
            else:
                out.append(m)
    return out


def wrap_units(unet: torch.nn.Module, depth: str, checkpointed: bool, on_enter=None) -> list[torch.nn.Module]:
    """Recompute each unit in backward (when `checkpointed`), and call `on_enter(index)` each time unit
    `index` begins to run, recomputations included. Returns the units."""
    found = units(unet, depth)
    for i, unit in enumerate(found):
        inner = unit.forward

        def run(*args, _inner=inner, _i=i, **kwargs):
            if on_enter is not None:
                on_enter(_i)
            return _inner(*args, **kwargs)

        def forward(*args, _run=run, _unit=unit, **kwargs):
            if checkpointed and _unit.training and torch.is_grad_enabled():
                return checkpoint(_run, *args, use_reentrant=False, **kwargs)
            return _run(*args, **kwargs)

        unit.forward = forward
    return found
