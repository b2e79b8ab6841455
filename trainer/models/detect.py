"""Tell the family (sd15, sd2, sdxl) and prediction type of a single-file checkpoint from its keys."""
from __future__ import annotations

from pathlib import Path

from ..errors import LoraLabError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")

SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
UNET_PREFIX = "model.diffusion_model."


def detect_single_file_family(path: Path) -> tuple[str, str | None]:
    """(family, prediction type or None when the weights don't tell)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise LoraLabError(f"{Path(path).name} is not a readable .safetensors file ({e}).",
                           "The download may be incomplete; download it again.")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
            raise LoraLabError(f"{Path(path).name} is a LoRA, not a base model.",
                               "Pick a full checkpoint as the base model and add the LoRA separately.")
        raise LoraLabError(f"{Path(path).name} is not a Stable Diffusion checkpoint (no UNet weights found).",
                           "Pick an SD 1.x, SD 2.x or SDXL checkpoint.")
    if SDXL_KEY in keys or any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl", None
    if SD2_KEY in keys or any(k.startswith("cond_stage_model.model.") for k in keys):
        # SD 2.x 768 models predict v; the 512 "base" models predict epsilon. The weights alone
        # don't say which, so a sidecar .yaml (as A1111 uses) or metadata decides, then v.
        sidecar = Path(path).with_suffix(".yaml")
        text = sidecar.read_text(errors="ignore") if sidecar.exists() else meta.get("modelspec.prediction_type", "")
        if "parameterization" in text and '"v"' not in text and "'v'" not in text and ": v" not in text:
            return "sd2", "epsilon"
        if "epsilon" in text:
            return "sd2", "epsilon"
        return "sd2", "v_prediction"
    return "sd15", None
