"""Weights per target set of each full-size family, for trainer/plan_summary.py's file-size estimates.

Builds each family's UNet and text encoders from the shipped configs on the meta device (no memory,
no download) and counts, per `network.targets`: the adapted layers' full weights (what an OFT `diff`
file holds) and the rank-1 LoRA weights (in + out per layer; ×rank for a LoRA file).
    .venv/bin/python tests/bench/adapter_sizes.py
"""
import json

import common  # noqa: F401  (puts the repository on the import path)

import torch


def sizes(family: str) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.adapters import target_modules
    from trainer.models.load import config_folder

    src = config_folder(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(src / d)) for d in ("text_encoder", "text_encoder_2")
               if (src / d).exists()]
    out = {}
    for targets in ("attention", "attention_ff", "all"):
        row = {}
        for part, models, te in (("unet", [unet], False), ("text", tes, True)):
            full = rank1 = 0
            for m in models:
                for name in target_modules(m, targets, te, "lora"):
                    w = m.get_submodule(name).weight
                    full += w.numel()
                    rank1 += w.shape[0] + w[0].numel()
            row[part] = {"full": full, "rank1": rank1}
        out[targets] = row
    return out


if __name__ == "__main__":
    print(json.dumps({f: sizes(f) for f in ("sd15", "sd2", "sdxl")}, indent=1))
