"""Does `train.compile` (torch.compile, inductor) compute the same LoRA gradients as the plain UNet?

The engine compiles the UNet only on GPUs: on the CPU (torch 2.13, inductor's C++ code) this check
found the whole mid block's LoRA gradients at zero, though the loss was the same; inductor's graph
capture and partitioning alone (backend aot_eager_decomp_partition) were exact, so the fault is in
its CPU code. Run it on a GPU before trusting compile there:
  .venv/bin/python tests/bench/check_compile.py --device cuda [--family sd15]
Prints the worst relative gradient difference and how many LoRA tensors got no gradient.
"""
import argparse
import tempfile
from pathlib import Path

from common import report

import torch
from bench_gpu import lora_unet, step_inputs

from trainer.compile_plan import compiled as compiled_unet


def gradients(unet, model, inputs) -> dict:
    lat, t, emb, extra = inputs
    unet.zero_grad(set_to_none=True)
    with torch.autocast(lat.device.type, dtype=torch.bfloat16, enabled=lat.device.type == "cuda"):
        out = model(lat, t, emb, added_cond_kwargs=extra).sample
    out.float().pow(2).mean().backward()
    return {n: p.grad.detach().float().clone() for n, p in unet.named_parameters() if p.requires_grad}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--family", default="tiny", choices=["tiny", "sd15", "sdxl"])
    ap.add_argument("--backend", default="inductor")
    a = ap.parse_args()
    preset, res, scale = {"tiny": ("cpu-demo", 256, 8), "sd15": ("sd15-8gb", 512, 8),
                          "sdxl": ("sdxl-12gb", 1024, 8)}[a.family]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    unet, _ = lora_unet(a.family, preset, a.device, dtype)
    for name, p in unet.named_parameters():
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # zero at the start of training: no gradient reaches lora_A
    inputs = step_inputs(unet, res, 1, scale, a.device)
    plain = gradients(unet, unet, inputs)
    with tempfile.TemporaryDirectory() as ws:  # the engine's way: one static graph per shape, its cache
        compiled = gradients(unet, compiled_unet(unet, Path(ws), 1, a.backend), inputs)
    worst = max(float((plain[k] - compiled[k]).abs().max() / plain[k].abs().max().clamp_min(1e-12)) for k in plain)
    zero = [k for k in plain if compiled[k].abs().max() == 0 < plain[k].abs().max()]
    report(f"compile_{a.family}_{a.device.split(':')[0]}", [
        {"device": a.device, "family": a.family, "backend": a.backend, "LoRA tensors": len(plain),
         "worst relative difference": f"{worst:.2e}", "no gradient when compiled": len(zero)}],
        {"without_gradient": sorted({k.rsplit(".lora_", 1)[0] for k in zero})})


if __name__ == "__main__":
    main()
