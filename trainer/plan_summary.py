"""Before a run starts: how many steps it is, roughly how much memory it needs, and what looks wrong."""
from __future__ import annotations

import math

# Frozen weights (GB, fp16) and activation cost per 512² image at batch 1, measured rules of thumb.
FAMILY_GB = {"sd15": (2.0, 1.6), "sd2": (2.6, 2.2), "sdxl": (6.9, 4.2), "tiny": (0.01, 0.01)}


def estimate_memory_gb(cfg, family: str) -> float:
    weights, act = FAMILY_GB.get(family, FAMILY_GB["sd15"])
    t = cfg.train
    if t.mixed_precision == "fp32":
        weights *= 2
    scale = (cfg.dataset.resolution / 512) ** 2 * t.batch_size
    if t.gradient_checkpointing:
        act *= 0.35
    lora_gb = 0.05 * cfg.network.rank / 16
    opt = lora_gb * (1 if t.optimizer == "adamw8bit" else 3)
    return round(weights + act * scale + lora_gb + opt, 1)


def family_guess(base: str) -> str:
    b = base.lower()
    if b.startswith("tiny-demo"):
        return "tiny"
    if "xl" in b:
        return "sdxl"
    if "v2" in b or "2-1" in b or "2.1" in b:
        return "sd2"
    return "sd15"


def plan(cfg, dataset_summary: dict | None) -> dict:
    """steps, epochs, memory and warnings for the summary shown before Start."""
    t, d = cfg.train, cfg.dataset
    warnings = []
    per_epoch = None
    if dataset_summary:
        images, repeats = dataset_summary["images"], dataset_summary["repeats"]
        per_epoch = math.ceil(repeats / t.batch_size / t.gradient_accumulation)
        if images < 5:
            warnings.append(f"Only {images} images: 10–30 varied images usually give a better LoRA.")
        prefix = d.caption_prefix.strip()
        if prefix and dataset_summary.get("captions"):
            missing = sum(1 for c in dataset_summary["captions"] if prefix not in c)
            if missing:
                warnings.append(f"The trigger word '{prefix}' is missing from {missing} captions; "
                                "it is added in front during training.")
        elif not prefix:
            warnings.append("No trigger word (caption prefix): the LoRA will apply without one.")
        sides = [int(s.split("x")[0]) * int(s.split("x")[1]) for s, _ in dataset_summary["sizes"]]
        if sides and max(sides) < d.resolution ** 2:
            warnings.append(f"Resolution {d.resolution} is above every image's size; images are not upscaled, "
                            "so a lower resolution trains faster for the same result.")
        if dataset_summary["missing_captions"]:
            warnings.append(f"{dataset_summary['missing_captions']} images have no caption.")
    family = family_guess(cfg.model.base)
    return {
        "steps": t.steps,
        "steps_per_epoch": per_epoch,
        "epochs": round(t.steps / per_epoch, 1) if per_epoch else None,
        "memory_gb": estimate_memory_gb(cfg, family),
        "warnings": warnings,
    }


def describe(p: dict, dataset_summary: dict | None) -> str:
    lines = []
    if dataset_summary:
        lines.append(f"**{dataset_summary['images']} images × repeats = {dataset_summary['repeats']} per epoch → "
                     f"{p['steps_per_epoch']} steps per epoch; {p['steps']} steps ≈ {p['epochs']} epochs.**")
    else:
        lines.append(f"**{p['steps']} steps.** Load a dataset to see epochs.")
    lines.append(f"Estimated accelerator memory: about {p['memory_gb']} GB.")
    lines += [f"⚠️ {w}" for w in p["warnings"]]
    return "\n\n".join(lines)
