"""Adapters (LoRA, DoRA, LoHa, LoKr, OFT) put into the UNet and text encoders with peft."""
from __future__ import annotations

import torch

from .errors import LoraLabError

ADAPTER = "default"
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_FF = ("fc1", "fc2")
# kohya's LoCon leaves these out: they are shared by every block and training them destabilises.
UNET_SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj")


def target_modules(model: torch.nn.Module, targets: str, text_encoder: bool, algorithm: str) -> list[str]:
    """Full names of the layers that get an adapter."""
    attn, ff = (TE_ATTN, TE_FF) if text_encoder else (UNET_ATTN, UNET_FF)
    wanted = attn + (ff if targets in ("attention_ff", "all") else ())
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == w or name.endswith("." + w) for w in wanted):
            names.append(name)
        elif targets == "all" and not text_encoder and not any(s in name for s in UNET_SKIP):
            names.append(name)
    if algorithm == "oft":
        # peft's OFT needs the block size to divide the layer's input width.
        names = [n for n in names if _in_features(model.get_submodule(n)) % 2 == 0]
    return names


def _in_features(mod) -> int:
    return mod.in_features if isinstance(mod, torch.nn.Linear) else mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]


def _oft_block(model, names, rank) -> int:
    """The largest block size ≤ rank that divides every target's input width."""
    widths = [_in_features(model.get_submodule(n)) for n in names]
    for b in range(max(1, rank), 0, -1):
        if all(w % b == 0 for w in widths):
            return b
    return 1


def peft_config(algorithm: str, rank: int, alpha: float, dropout: float, names: list[str], model,
                init_weights: str = "gaussian"):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    if algorithm in ("lora", "dora"):
        # peft's True is kaiming-uniform with a=sqrt(5) on the down (A) half, as sd-scripts' LoRAModule does.
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                          init_lora_weights="gaussian" if init_weights == "gaussian" else True,
                          use_dora=algorithm == "dora")
    if algorithm == "loha":
        return LoHaConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=names)
    if algorithm == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=names)
    if algorithm == "oft":
        return OFTConfig(r=0, oft_block_size=_oft_block(model, names, rank), module_dropout=dropout,
                         target_modules=names)
    raise LoraLabError(f"network.algorithm {algorithm!r} is not known.", "Use lora, dora, loha, lokr or oft.")


def add_adapter(model: torch.nn.Module, net, text_encoder: bool = False) -> list[str]:
    """Inject the configured adapter into `model`; returns the targeted layer names."""
    from peft import inject_adapter_in_model

    names = target_modules(model, net.targets, text_encoder, net.algorithm)
    if not names:
        raise LoraLabError(f"No layers match network.targets={net.targets!r} in this model.",
                           "Use attention, attention_ff or all.")
    inject_adapter_in_model(peft_config(net.algorithm, net.rank, net.alpha, net.dropout, names, model,
                                        net.init_weights), model,
                            adapter_name=ADAPTER)
    if net.algorithm == "oft":
        exact_oft_convs(model)
    for n, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(n))
    return names


def exact_oft_convs(model: torch.nn.Module) -> int:
    """Make peft's OFT on k×k convolutions compute the layer it merges into; returns the layers changed.

    peft (0.21) rotates a k×k convolution's input patches: it unfolds the input with the kernel,
    without padding, rotates each patch and folds the patches back, summing where they overlap. So
    an untrained adapter (identity rotation) already multiplies the input by up to k·k (the tiny
    UNet's output moves by ~1.5 on a scale of ~1.7), the trained layer is not the one `merge` (and
    so the exported file) gives, and a feature map smaller than the kernel raises a RuntimeError
    (SD 1.5/2 below 192 px, SDXL below 96 px: the deepest level is the latent / 8, resp. / 4).
    Instead each layer convolves with its rotated filters, exactly what peft's `merge` writes into the
    weight (each block of the flattened (in·k·k) filter axis times its Cayley rotation): the same
    trainable parameters, at any resolution, and an identity at initialisation. 1x1 convolutions and
    Linear layers are left to peft (there unfold/fold is exact)."""
    import types

    from peft.tuners.oft.layer import Conv2d as OFTConv2d

    layers = [m for _, m in adapter_layers(model)
              if isinstance(m, OFTConv2d) and tuple(m.get_base_layer().kernel_size) != (1, 1)]
    for layer in layers:
        layer.forward = types.MethodType(_oft_rotated_conv_forward, layer)
    return len(layers)


def _oft_rotated_filters(rot, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in, k, k) with each block of its flattened filter axis rotated: peft's merge
    (oft_mat @ weight.view(out, -1).T).T without building the dense block-diagonal matrix."""
    blocks = rot._cayley_batch(rot.weight, rot.block_size, rot.use_cayley_neumann, rot.num_cayley_neumann_terms)
    n = weight[0].numel() // rot.block_size
    blocks = blocks.expand(n, -1, -1) if blocks.shape[0] == 1 else blocks  # block_share: one block for all
    w = weight.reshape(weight.shape[0], n, rot.block_size).to(blocks.dtype)
    return torch.einsum("ipq,oiq->oip", blocks, w).reshape(weight.shape)


def _oft_rotated_conv_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    active = [a for a in self.active_adapters if a in self.oft_R]
    if self.disable_adapters or self.merged or not active:
        if self.disable_adapters and self.merged:
            self.unmerge()
        return base(x, *args, **kwargs)
    weight = base.weight
    for name in active:
        weight = _oft_rotated_filters(self.oft_R[name], weight)
    # a base stored in fp8 (base_weights.StoredConv2d) is computed in its compute_dtype
    return base._conv_forward(x, weight.to(getattr(base, "compute_dtype", base.weight.dtype)), base.bias)


def skip_input_casts(model: torch.nn.Module, algorithm: str) -> int:
    """Stop peft casting each LoRA layer's input to the adapter's dtype; returns the layers changed.

    Under mixed precision the adapter weights are fp32 and the frozen model bf16/fp16. peft casts the
    input up to fp32 before the adapter's matmuls, and autocast casts it straight back down for them,
    forward and backward: work that changes no number. At batch 1 a fast GPU waits on the host's
    launches, so it shows: +7 % steps/s for SD 1.5 on an H200 (tests/bench/profile_step.py
    --peft-casts). Only for LoRA, whose maths is all autocast matmuls (DoRA computes its weight norm
    in the input's dtype, so a bf16 input would make it coarser), and only for models that always
    run under autocast (the UNet: training steps and samples)."""
    if algorithm != "lora":
        return 0
    layers = adapter_layers(model)
    for _, layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def _is_adapter_param(name: str) -> bool:
    return any(t in name for t in ("lora_", "hada_", "lokr_", "oft_R"))


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_adapter_param(n)]


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise LoraLabError(f"{len(unexpected)} saved adapter weights do not fit this model (e.g. {unexpected[0]}).",
                           "The checkpoint was made with other network settings or another base model.")


def adapter_layers(model: torch.nn.Module):
    """(name, peft layer) for every layer holding an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
