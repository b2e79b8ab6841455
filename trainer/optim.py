"""Optimizers, learning-rate schedules and losses, by the names the config uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LoraLabError


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, device: torch.device):
    if name == "adamw":
        # one fused kernel for every tensor (CUDA, and the CPU since torch 2.4): PyTorch's default on the CPU
        # steps each tensor in Python, 128 of them for SD 1.5's LoRA
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise LoraLabError(f"adamw8bit needs bitsandbytes, which failed to import ({e}).",
                               "Install bitsandbytes, or use optimizer adamw.")
        # bitsandbytes keeps 32-bit state for tensors under 4096 elements unless told otherwise,
        # which is every LoRA weight: lower the threshold so the state really is 8-bit.
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, min_8bit_size=16)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    raise LoraLabError(f"train.optimizer {name!r} is not known.")


def make_scheduler(name: str, optimizer, warmup: int, total: int):
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def compute_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    """Per-sample loss [B]."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        loss = F.mse_loss(pred, target, reduction="none")
    elif kind == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif kind == "huber":
        loss = F.huber_loss(pred, target, reduction="none", delta=delta)
    elif kind == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, reduction="none", beta=delta)
    else:
        raise LoraLabError(f"train.loss {kind!r} is not known.")
    return loss.mean(dim=list(range(1, loss.dim())))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(alphas_cumprod, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as diffusers' training examples compute them."""
    s = snr(alphas_cumprod, timesteps)
    w = torch.clamp(s, max=gamma) / s
    if prediction_type == "v_prediction":
        w = torch.clamp(s, max=gamma) / (s + 1)
    return w
