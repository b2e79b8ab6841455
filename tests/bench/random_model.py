"""A full-size SD 1.5 / SD 2 / SDXL diffusers folder with random weights, built from the shipped configs.

The engine loads it like a downloaded model (its real shapes, sizes and loading code), so the GPU
benchmarks need no download. The weights are saved in fp16, as most published checkpoints are.
    .venv/bin/python tests/bench/random_model.py sd15 /tmp/sd15-random [--device cuda]
"""
import argparse
import shutil
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on the import path)

import torch


def make_random_model(family: str, out: Path, device: str = "cpu") -> Path:
    """Write the folder once; a complete one (model_index.json last) is reused."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.load import config_folder

    out = Path(out)
    if (out / "model_index.json").exists():
        return out
    src = config_folder(family)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model_index.json", ".complete"))
    torch.manual_seed(0)
    parts = {"unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet")),
             "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae")),
             "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder"))}
    if (src / "text_encoder_2").exists():
        parts["text_encoder_2"] = lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(src / "text_encoder_2"))
    for name, build in parts.items():
        with torch.device(device):  # random initialisation of billions of weights is quicker on a GPU
            model = build()
        model.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        del model
    shutil.copy(src / "model_index.json", out / "model_index.json")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=["sd15", "sd2", "sdxl"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t0 = time.time()
    make_random_model(a.family, a.out, a.device)
    print(f"{a.out} ready in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
