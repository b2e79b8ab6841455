"""Seconds per sampling step (one UNet evaluation at batch 2: prompt and negative) of full-size UNets
on this machine's CPU, at a small size scaled to 512² (the cost grows with the pixel count). The
figures feed `trainer/plan_summary.CPU_UNET_S`, which Check settings uses to say how long a round of
sample images takes on a CPU.
    .venv/bin/python tests/bench/bench_sample_time.py [--families sd15 sdxl] [--side 256] [--threads 2]
"""
import argparse
import time

import common  # noqa: F401  (puts the repository on the import path)

import torch


def unet_step_seconds(family: str, side: int, repeats: int = 3) -> float:
    from diffusers import UNet2DConditionModel

    from trainer.models.load import config_folder

    src = config_folder(family) / "unet"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src)).eval()
    c = unet.config
    x = torch.randn(2, c.in_channels, side // 8, side // 8)
    ctx = torch.randn(2, 77, c.cross_attention_dim)
    extra = {}
    if c.addition_embed_type == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": torch.zeros(2, 6)}}
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            unet(x, torch.tensor([500, 500]), ctx, **extra)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} threads, fp32, batch 2, {a.side}² measured, scaled to 512² by pixel count")
    for fam in a.families:
        s = unet_step_seconds(fam, a.side)
        print(f"{fam}: {s:.2f} s per step at {a.side}² → {s * (512 / a.side) ** 2:.1f} s at 512²")


if __name__ == "__main__":
    main()
