"""Does `train.compile` (torch.compile, inductor) compute the same LoRA gradients as the plain UNet?

The engine compiles the UNet only on GPUs: on the CPU (torch 2.13, inductor's C++ code) this check
found the whole mid block's LoRA gradients at zero, though the loss was the same; inductor's graph
capture and partitioning alone (backend aot_eager_decomp_partition) were exact, so the fault is in
its CPU code. Run it on a GPU before trusting compile there:
  .venv/bin/python tests/bench/check_compile.py --device cuda [--family sd15] [--mode reduce-overhead]
Prints the worst relative gradient difference and how many LoRA tensors got no gradient, over three
compiled steps (CUDA graphs, `--mode reduce-overhead`, record on the second and replay from the third),
and the forward-and-backward steps/s of both after them. The engine does not use CUDA graphs yet; this
tells whether they keep the gradients and what they gain (issue 20).
"""
import argparse
import tempfile
import time
from pathlib import Path

from common import report

import torch
from bench_gpu import lora_unet, step_inputs

from trainer.compile_plan import compiled as compiled_unet


def gradients(unet, model, inputs) -> dict:
    lat, t, emb, extra = inputs
    unet.zero_grad(set_to_none=True)
    if lat.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: CUDA graphs may reuse their outputs
    with torch.autocast(lat.device.type, dtype=torch.bfloat16, enabled=lat.device.type == "cuda"):
        out = model(lat, t, emb, added_cond_kwargs=extra).sample
    out.float().pow(2).mean().backward()
    return {n: p.grad.detach().float().clone() for n, p in unet.named_parameters() if p.requires_grad}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--family", default="tiny", choices=["tiny", "sd15", "sdxl"])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--mode", default=None, help="torch.compile's mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--steps", type=int, default=10, help="steps timed for steps/s, after the checked ones")
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
        model = compiled_unet(unet, Path(ws), 1, a.backend, a.mode)
        t0 = time.perf_counter()
        steps = [gradients(unet, model, inputs) for _ in range(3)]  # CUDA graphs: warm-up, record, replay
        first = time.perf_counter() - t0
        speed = {"plain": steps_per_second(lambda: gradients(unet, unet, inputs), a.steps),
                 "compiled": steps_per_second(lambda: gradients(unet, model, inputs), a.steps)}
    worst = max(float((plain[k] - c[k]).abs().max() / plain[k].abs().max().clamp_min(1e-12)) for c in steps
                for k in plain)
    zero = {k for c in steps for k in plain if c[k].abs().max() == 0 < plain[k].abs().max()}
    name = f"compile_{a.family}_{a.device.split(':')[0]}" + (f"_{a.mode}" if a.mode else "")
    report(name, [{"device": a.device, "family": a.family, "backend": a.backend, "mode": a.mode or "default",
                   "LoRA tensors": len(plain), "worst relative difference (3 steps)": f"{worst:.2e}",
                   "no gradient when compiled": len(zero), "first 3 compiled steps (s)": f"{first:.1f}",
                   "steps/s plain": f"{speed['plain']:.2f}", "steps/s compiled": f"{speed['compiled']:.2f}"}],
           {"without_gradient": sorted({k.rsplit(".lora_", 1)[0] for k in zero})})


def steps_per_second(step, n: int) -> float:
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
