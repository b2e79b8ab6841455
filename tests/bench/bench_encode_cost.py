"""Benchmark 1b: what caching saves at full size. The tiny model's VAE and text encoder cost next to
nothing, so benchmark 1 cannot show it; here the real SD 1.5 VAE and CLIP text encoder (built from
the shipped configs, random weights, no download) encode one 512 px image and caption, as diffusers'
reference LoRA script does every step, against one engine training step of the real SD 1.5 UNet
with a rank-16 LoRA at 512 px, batch 1 (the sd15-8gb preset's settings).

Run: .venv/bin/python tests/bench/bench_encode_cost.py [--device cuda] [--steps N]
On a 2-core CPU it takes a few minutes (one UNet step is tens of seconds there).
"""
import argparse

from common import report, timed

import torch


def encoders(device: str, dtype):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.load import config_folder
    from trainer.prepare import cast

    folder = config_folder("sd15")
    with torch.device(device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).eval()
        cast(vae, device, dtype)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).to(dtype).eval()
    return vae, te


def encode_seconds(dev: str, dtype, steps: int) -> float:
    vae, te = encoders(dev, dtype)
    image = torch.rand(1, 3, 512, 512, device=dev, dtype=dtype) * 2 - 1
    ids = torch.randint(0, 49408, (1, 77), device=dev)

    @torch.no_grad()
    def encode():
        vae.encode(image).latent_dist.sample()
        te(ids)

    return timed(encode, steps, dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    from bench_gpu import training_step

    dev = a.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    encode_s = encode_seconds(dev, dtype, a.steps)  # its models are freed before the UNet is built
    step = training_step("sd15", "sd15-8gb", 512, 1, dev)
    step_s = timed(step, a.steps, dev)
    rows = [{"work per image": "VAE encode 512 px + CLIP text encode", "seconds": f"{encode_s:.3f}"},
            {"work per image": "UNet LoRA training step (rank 16, sd15-8gb)", "seconds": f"{step_s:.3f}"}]
    report("encode_cost", rows, {"device": dev, "dtype": str(dtype).replace("torch.", ""),
                                 "encode_share_of_uncached_step": round(encode_s / (encode_s + step_s), 3),
                                 "caching_speedup_full_size": round((encode_s + step_s) / step_s, 2)})


if __name__ == "__main__":
    main()
