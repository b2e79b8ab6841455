"""Read the LoRA layouts other tools write, as the kohya names LoRA Lab computes with.

Layouts read:
- kohya / LyCORIS (`lora_unet_…`, `lora_te…`): sd-scripts, kohya_ss, OneTrainer, LyCORIS, LoRA Lab.
  sd-scripts' SDXL files name UNet layers as the original code did (`lora_unet_input_blocks_4_1_…`);
  diffusers' converter names SD 1.x text encoders `lora_te1_`.
- diffusers and peft (`unet.…lora.down.weight`, `…lora_A.weight`, `…to_q_lora.down.weight`,
  `…lora_linear_layer.down.weight`, `lora_magnitude_vector`, with `unet.` / `text_encoder.` prefixes
  or none, or peft's `base_model.model.`): diffusers' training scripts and `save_lora_weights`, peft.
  diffusers' own converters take them to peft names and then to kohya names; the alpha comes from the
  file's `lora_adapter_metadata` (diffusers' `convert_state_dict_to_kohya` would write alpha = rank).
- ComfyUI (`diffusion_model.input_blocks.4.1.…`, its training node's SaveLoRA and its LoRA
  extraction; also `diff` for norms and `diff_b` for biases).
- OneTrainer's OMI layout (`unet.input_blocks.4.1.….lora_down.weight`, `clip_l.…`, `clip_g.…`); its
  legacy layout is kohya's. ai-toolkit writes kohya files for SD 1.x and SDXL.
"""
from __future__ import annotations

import json
import math
import re

import torch

from .errors import LoraLabError
from .export import kohya_key, named_parts
from .ldm_names import unet_ldm_names

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Key suffixes after a layer's name, longest first so `lora_magnitude_vector.weight` wins.
SUFFIXES = sorted(
    ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "diff", "diff_b",
     "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
     "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
     "oft_blocks", "oft_diag", "rescale", "lora_A.weight", "lora_B.weight", "lora.up.weight", "lora.down.weight",
     "lora_magnitude_vector", "lora_magnitude_vector.weight"], key=len, reverse=True)
PEFT_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
              "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"}
COMFY_PARTS = {"diffusion_model.": "lora_unet_", "model.diffusion_model.": "lora_unet_",
               "text_encoders.clip_l.transformer.": "lora_te1_", "text_encoders.clip_g.transformer.": "lora_te2_",
               "cond_stage_model.transformer.": "lora_te_"}
# OneTrainer's OMI layout (its modules/util/convert/lora/convert_sd_lora.py and convert_sdxl_lora.py): the
# UNet under its original names, text encoders as clip_l / clip_g, kohya / LyCORIS suffixes.
OMI_PARTS = {"unet.": "lora_unet_", "clip_l.": "lora_te1_", "clip_g.": "lora_te2_"}
KOHYA_SUFFIXES = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "diff", "diff_b",
                  "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                  "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "oft_blocks", "oft_diag", "rescale"}
OTHER_MODELS = ("lora_transformer_", "transformer.", "double_blocks", "single_blocks", "joint_blocks",
                "diffusion_model.double_blocks", "diffusion_model.joint_blocks", "lora_unet_double_blocks")


def layout(keys) -> str:
    """The name of a file's key layout, as a user knows it."""
    keys = list(keys)
    if not keys:
        return "empty"
    if any(k.startswith(OTHER_MODELS) for k in keys):
        return "transformer model (Flux, SD3 or another non-UNet model)"
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIXES)]
    if len(kohya) * 2 >= len(keys):  # sd-scripts may bundle embeddings (`bundle_emb.…`) beside the layers
        return "LyCORIS" if any(_suffix(k) not in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
                                for k in kohya) else "kohya"
    if any(k.startswith(tuple(COMFY_PARTS)) for k in keys):
        return "ComfyUI"
    if any(k.startswith(tuple(OMI_PARTS)) and _suffix(k) in KOHYA_SUFFIXES for k in keys):
        return "OneTrainer (OMI)"
    if any(s in k for k in keys for s in ("lora_A", "lora_B", "lora.down", "to_out_lora", "lora_linear_layer",
                                           "lora_magnitude_vector")):
        return "peft" if any("lora_A" in k for k in keys) else "diffusers"
    return "unknown"


def _suffix(key: str) -> str:
    for s in SUFFIXES:
        if key.endswith("." + s):
            return s
    return key.rpartition(".")[2]


def _split(key: str) -> tuple[str, str]:
    s = _suffix(key)
    return key[: -len(s) - 1], s


def module_aliases(model) -> dict[str, str]:
    """{every kohya name a file may use for a layer: LoRA Lab's own kohya name for it}.

    Own names use diffusers' module names. Aliases: the UNet's original (LDM/SGM) names, `lora_te1_`
    for a single text encoder, and text-encoder names with and without transformers' `text_model.`.
    """
    out = {}
    ldm = unet_ldm_names(model.unet)
    for prefix, root in named_parts(model):
        te_prefixes = [prefix, "lora_te1_"] if prefix == "lora_te_" else [prefix]
        for name, mod in root.named_modules():
            if not name or not hasattr(mod, "weight"):
                continue
            own = kohya_key(prefix, name)
            out[own] = own
            if prefix == "lora_unet_":
                out[kohya_key(prefix, ldm[name])] = own
                continue
            bare = name[len("text_model."):] if name.startswith("text_model.") else name
            for p in te_prefixes:
                out[kohya_key(p, name)] = own
                out[p + bare.replace(".", "_")] = own
    return out


def _from_prefixed(tensors: dict, parts: dict) -> dict:
    """Keys `<part><dotted layer name>.<suffix>` (ComfyUI, OneTrainer's OMI) in kohya names."""
    out = {}
    for key, t in tensors.items():
        for part, prefix in parts.items():
            if key.startswith(part):
                name, suffix = _split(key[len(part):])
                out[f"{prefix}{name.replace('.', '_')}.{PEFT_NAMES.get(suffix, suffix)}"] = t
                break
        else:
            out[key] = t  # already kohya, or refused below as not fitting
    return out


def _peft_alphas(meta: dict) -> dict:
    try:
        return json.loads(meta.get("lora_adapter_metadata", "") or "{}")
    except json.JSONDecodeError:
        return {}


def _alpha(config: dict, part: str, module: str, rank: int) -> float:
    """The kohya alpha (scale = alpha / rank) of one layer of a peft / diffusers file."""
    alpha = config.get(f"{part}.lora_alpha", rank)
    for pattern, value in (config.get(f"{part}.alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = value
    if config.get(f"{part}.use_rslora"):
        alpha = alpha * rank / math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(rank)
    return float(alpha)


TE_WORDS = ("text_model", "encoder.layers", "self_attn", "mlp.fc", "text_projection")


def _part_of(path: str) -> str:
    """unet, text_encoder or text_encoder_2: from the key's prefix, or what names the layer when it has none."""
    for part in ("unet.", "text_encoder_2.", "text_encoder."):
        if path.startswith(part):
            return part[:-1]
    return "text_encoder" if any(w in path for w in TE_WORDS) else "unet"


def _from_diffusers(tensors: dict, meta: dict) -> dict:
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_kohya, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    sd = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    te = {k: v for k, v in sd.items() if _part_of(k) != "unet"}
    if any("to_out_lora" in k or "lora_linear_layer" in k for k in te):
        te = convert_state_dict_to_peft(te)  # old diffusers text-encoder names (q_proj.lora_linear_layer…)
    unet = {k: v for k, v in sd.items() if _part_of(k) == "unet"}
    sd = {**convert_unet_state_dict_to_peft(unet), **convert_unet_state_dict_to_peft(te)}
    config = _peft_alphas(meta)
    peft, extra, alphas = {}, {}, {}
    for key, t in sd.items():
        path, suffix = _split(key)
        part = _part_of(path)
        full = path if path.startswith(part + ".") else f"{part}.{path}"
        if suffix in ("lora_A.weight", "lora_B.weight"):
            peft[f"{full}.{suffix}"] = t
            if suffix == "lora_A.weight":
                extra[(full, "alpha")] = torch.tensor(_alpha(config, part, full.removeprefix(part + "."), t.shape[0]))
        elif suffix.startswith("lora_magnitude_vector"):
            extra[(full, "dora_scale")] = t.flatten()  # one per output channel; peft's conv shape is (1, out, 1, 1)
        elif suffix == "alpha":
            alphas[(full, "alpha")] = t
        else:
            raise LoraLabError(f"This {layout(tensors)} file has a key LoRA Lab cannot read: {key}.",
                               "LoRA Lab reads LoRA and DoRA weights in diffusers/peft files.")
    out = convert_state_dict_to_kohya(peft)  # alpha = rank there; the trained alphas replace them below
    for (full, suffix), t in {**extra, **alphas}.items():
        base = next(iter(convert_state_dict_to_kohya({f"{full}.lora_A.weight": torch.zeros(1)}))).partition(".")[0]
        out[f"{base}.{suffix}"] = t
    return out


def canonical(tensors: dict, meta: dict, model) -> tuple[dict, str]:
    """The file's tensors named as LoRA Lab names this model's layers, and the file's layout.

    Keys that name no layer of this model keep their names (the caller counts what fits)."""
    kind = layout(tensors)
    if kind.startswith("transformer model") or kind in ("unknown", "empty"):
        raise LoraLabError(
            f"This file's layout is {kind} (keys like {next(iter(tensors), '-')}), not a Stable Diffusion LoRA.",
            "LoRA Lab reads kohya, LyCORIS, diffusers, peft, ComfyUI and OneTrainer LoRA files for SD 1.x, SD 2.x "
            "and SDXL.")
    if kind == "ComfyUI":
        tensors = _from_prefixed(tensors, COMFY_PARTS)
    elif kind == "OneTrainer (OMI)":
        tensors = _from_prefixed(tensors, OMI_PARTS)
    elif kind in ("diffusers", "peft"):
        tensors = _from_diffusers(tensors, meta)
    aliases = module_aliases(model)
    out = {}
    for key, t in tensors.items():
        base, _, suffix = key.partition(".")
        out[f"{aliases.get(base, base)}.{suffix}"] = t
    return out, kind
