"""Read LoRA / LyCORIS files and apply them to a base model at chosen strengths.

This is the project's own loader: it merges each file's weight difference into the base weights
(and can take it out again), for every layout we write — LoRA, DoRA, LoHa, LoKr and `diff` —
so that one code path serves the sampler, the test tab and the reload checks of every algorithm.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import LoraLabError
from .export import BASE_VERSION, kohya_key, named_parts
from .ldm_names import unet_ldm_names
from .lora_formats import canonical, layout

FAMILY_OF_VERSION = {v: k for k, v in BASE_VERSION.items()}


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"LoRA file {path} does not exist.", "Check the path.")
    if path.suffix.lower() != ".safetensors":
        raise LoraLabError(f"{path.name} is not a .safetensors LoRA file.", "Pick a .safetensors file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # safetensors has its own error types for damaged files
        raise LoraLabError(f"{path.name} is not a readable .safetensors file ({e}).", "Download or export it again.")
    return tensors, {**_peft_folder_config(path), **meta}


def _peft_folder_config(path: Path) -> dict[str, str]:
    """peft's `save_pretrained` keeps the alpha in adapter_config.json beside the weights: read it as
    diffusers' `lora_adapter_metadata` (the same LoraConfig fields, per model part)."""
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return {}
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    return {"lora_adapter_metadata": json.dumps({f"{part}.{k}": v for part in ("unet", "text_encoder", "text_encoder_2")
                                                 for k, v in fields.items()})}


PATCHABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _module_map(model) -> dict[str, torch.nn.Module]:
    out = {}
    for prefix, root in named_parts(model):
        for name, mod in root.named_modules():
            if isinstance(mod, PATCHABLE):
                out[kohya_key(prefix, name)] = mod
    return out


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        base, _, suffix = key.partition(".")
        groups.setdefault(base, {})[suffix] = t.float()
    return groups


def delta_weight(p: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight difference one file entry makes to `weight`, at strength 1."""
    w = weight.float()
    shape = w.shape
    if "diff" in p:
        return p["diff"].reshape(shape)
    if "lora_down.weight" in p:
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        rank = down.shape[0]
        scale = p["alpha"].item() / rank if "alpha" in p else 1.0
        if "lora_mid.weight" in p:  # LyCORIS LoCon with a Tucker core: up (out, r), core (r, r, k, k), down (r, in)
            core = torch.einsum("i j ..., i p, j r -> p r ...", p["lora_mid.weight"], up.flatten(1).T, down.flatten(1))
            delta = core.reshape(shape) * scale
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
        if "dora_scale" in p:
            return _dora(p["dora_scale"], w, delta)
        return delta
    if "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        scale = p["alpha"].item() / rank if "alpha" in p else 1.0
        return ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(shape) * scale
    if any(k.startswith("lokr_") for k in p):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        else:
            w2 = (p["lokr_w2_a"] @ p["lokr_w2_b"].flatten(1))
        dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
        scale = p["alpha"].item() / dim if dim and "alpha" in p else 1.0
        if w.dim() == 4 and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.shape[1] != shape[1] // w1.shape[1] else \
                w2.unsqueeze(2).unsqueeze(3)
        k = torch.kron(w1.reshape(*w1.shape, *([1] * (w2.dim() - 2))), w2)
        return k.reshape(shape) * scale
    if "oft_blocks" in p:
        return _lycoris_oft(p, w)
    raise LoraLabError(f"LoRA Lab cannot compute this layer kind yet (keys {sorted(p)}).",
                       "LoRA Lab reads LoRA, LoCon (with a Tucker core too), DoRA, LoHa, LoKr, OFT blocks and "
                       "full (diff) layers; BOFT, GLoRA and IA3 are not supported.")


def _lycoris_oft(p: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """LyCORIS' diagonal OFT (`oft_blocks`, optional `rescale`, `alpha` = constraint per output
    channel): each block of output channels rotated by the Cayley transform of a skew matrix."""
    blocks = p["oft_blocks"]
    n, b, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    constraint = p["alpha"].item() * w.shape[0] if "alpha" in p else 0.0
    if constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    eye = torch.eye(b)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    merged = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)
    if "rescale" in p:
        merged = p["rescale"].reshape(-1, *[1] * (w.dim() - 1)) * merged
    return merged - w


def _dora(scale: torch.Tensor, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA: the merged weight, rescaled to the trained magnitude per output channel (peft, LyCORIS
    `wd_on_out`; magnitude shaped (out[, 1, 1, 1])) or per input channel (LyCORIS' other axis, (1, in[, 1, 1]))."""
    merged = w + delta
    if scale.dim() == 1 or (scale.shape[0] == w.shape[0] and scale.shape[0] != 1):
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))
    return scale.reshape(norm.shape) * merged / norm - w


def layer_change(p: dict[str, torch.Tensor], mod: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{"weight": Δ, "bias": Δ} one file entry makes to a layer at strength 1 (ComfyUI files carry `diff_b`)."""
    out = {}
    if set(p) - {"diff_b", "alpha"}:
        out["weight"] = delta_weight(p, mod.weight.data)
    if "diff_b" in p:
        if mod.bias is None:
            raise RuntimeError("the layer has no bias")
        out["bias"] = p["diff_b"].reshape(mod.bias.shape)
    return out


class AppliedLoras:
    """LoRA files merged into a model's weights; `remove()` puts the original weights back."""

    def __init__(self, model, loras: list[tuple[Path, float]]):
        self.model = model
        self.saved: dict[str, torch.Tensor] = {}
        self._modules = _module_map(model)
        try:
            for path, strength in loras:
                self._apply(path, strength)
        except BaseException:
            self.remove()  # a refused second file must not leave the first merged
            raise

    def _apply(self, path: Path, strength: float) -> None:
        modules = self._modules
        model = self.model
        tensors, meta = read_lora(path)
        tensors, kind = canonical(tensors, meta, model)
        groups = _group(tensors)
        matched = [g for g in groups if g in modules]
        changes = {}
        for name in matched:
            try:
                changes[name] = layer_change(groups[name], modules[name])
            except RuntimeError:  # a layer of the same name but another shape: another family
                pass
        if len(changes) < max(1, len(groups) // 2) or len(changes) < len(matched):
            made_for = FAMILY_OF_VERSION.get(meta.get("ss_base_model_version", ""), "another model")
            raise LoraLabError(
                f"{Path(path).name} does not fit this {model.family} base model "
                f"({len(changes)} of {len(groups)} layers fit; a {kind} file made for {made_for}).",
                f"Pick a {model.family} LoRA, or the base model family the LoRA was trained on.")
        for name, change in changes.items():
            mod = modules[name]
            for attr, delta in change.items():
                param = getattr(mod, attr)
                self.saved.setdefault((name, attr), param.data.clone())
                param.data = (param.data.float() + strength * delta.to(param.device)).to(param.dtype)

    def remove(self) -> None:
        for (name, attr), w in self.saved.items():
            getattr(self._modules[name], attr).data = w
        self.saved.clear()


def lora_info(path: Path) -> dict:
    """What a user wants to know of a LoRA file before using it."""
    tensors, meta = read_lora(path)
    kinds = {"lora_down.weight": "LoRA", "lora_A.weight": "LoRA", "lora.down.weight": "LoRA", "hada_w1_a": "LoHa",
             "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "diff": "diff", "oft_blocks": "OFT"}
    found = {kinds[s] for k in tensors for s in kinds if k.endswith("." + s)}
    if any(k.endswith((".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")) for k in tensors):
        found = {"DoRA"}
    cfg = meta.get("lora_lab_config")
    return {"family": FAMILY_OF_VERSION.get(meta.get("ss_base_model_version", ""), "unknown"),
            "type": ", ".join(sorted(found)) or "unknown", "rank": meta.get("ss_network_dim"),
            "alpha": meta.get("ss_network_alpha"), "steps": meta.get("ss_steps"),
            "trigger": meta.get("ss_trigger_word", ""), "tensors": len(tensors),
            "base": meta.get("ss_sd_model_name", ""),
            "has_config": bool(cfg), "layout": layout(tensors), "args": json.loads(meta.get("ss_network_args", "{}") or "{}")}


def load_into_diffusers(pipe, path: Path, adapter_name: str | None = None) -> None:
    """Load a LoRA Lab file into a diffusers pipeline with its own `load_lora_weights`.

    Plain LoRA files load with `pipe.load_lora_weights(path)` as they are. diffusers (0.42) drops
    `dora_scale` from kohya-layout files for SD and SDXL, so DoRA files go through here: the file is
    put into diffusers' peft layout (magnitudes kept, alpha/rank folded into the up weights).
    """
    tensors, _ = read_lora(path)
    parts = [("lora_unet_", "unet", pipe.unet), ("lora_te_", "text_encoder", pipe.text_encoder),
             ("lora_te1_", "text_encoder", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.append(("lora_te2_", "text_encoder_2", pipe.text_encoder_2))
    names = {}
    for prefix, attr, module in parts:
        for name, _ in module.named_modules():
            names[kohya_key(prefix, name)] = f"{attr}.{name}"
    for name, ldm in unet_ldm_names(pipe.unet).items():  # SDXL files name UNet layers as sd-scripts does
        names[kohya_key("lora_unet_", ldm)] = f"unet.{name}"
    state = {}
    for base, p in _group(tensors).items():
        if "lora_down.weight" not in p or base not in names:
            continue
        scale = p["alpha"].item() / p["lora_down.weight"].shape[0] if "alpha" in p else 1.0
        state[f"{names[base]}.lora_A.weight"] = p["lora_down.weight"]
        state[f"{names[base]}.lora_B.weight"] = p["lora_up.weight"] * scale
        if "dora_scale" in p:
            # transformers' load_adapter (text encoders) wants the ".weight" suffix; diffusers' UNet path not.
            suffix = "" if base.startswith("lora_unet_") else ".weight"
            mag = p["dora_scale"].flatten()
            # peft keeps a convolution's magnitude as (1, out, 1, 1), a linear layer's as (out,).
            state[f"{names[base]}.lora_magnitude_vector{suffix}"] = mag.reshape(1, -1, 1, 1) if p[
                "lora_down.weight"].dim() == 4 else mag
    pipe.load_lora_weights(state, adapter_name=adapter_name)
