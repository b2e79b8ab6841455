"""Where a GPU training step's time goes: the host (Python and kernel launches) or the GPU's kernels.

    python tests/bench/profile_step.py [--family sd15] [--preset sd15-8gb] [--batch 1] [--compile]
Prints the time of one kernel launch on this machine, then for the engine's step (bench_gpu.py):
steps/second, the host's time per step, the GPU's busy time per step and the kernels per step
(torch.profiler); with --peft-casts the same with peft's input casts left on (the engine turns them
off: trainer.adapters.skip_input_casts), with --before the same as the engine stepped before issue 20
(train.fused_lora and train.fast_norms off, fp32 text embeddings), and with --compile the step under
torch.compile.
"""
import argparse
import time

from bench_gpu import training_step
from common import report, timed

import torch


def launch_us(n: int = 20000) -> float:
    x = torch.zeros(1, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def profile(step, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    return {"kernels_per_step": len(kernels) / steps, "gpu_busy_ms_per_step": gpu_us / steps / 1e3, "table": table}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--preset", default="sd15-8gb")
    ap.add_argument("--res", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--before", action="store_true", help="also the step as before issue 20's fewer launches")
    ap.add_argument("--peft-casts", action="store_true", help="also time the step with peft's input casts, "
                    "which the engine turns off")
    a = ap.parse_args()
    res = a.res or (1024 if a.family == "sdxl" else 512)
    rows = [{"what": "one kernel launch (µs)", "value": f"{launch_us():.1f}"}]
    step = training_step(a.family, a.preset, res, a.batch, "cuda")
    dt = timed(step, 20, "cuda", warmup=3)
    p = profile(step)
    print(p["table"])
    rows += [{"what": "eager steps/s", "value": f"{1 / dt:.2f}"},
             {"what": "eager ms per step", "value": f"{dt * 1e3:.1f}"},
             {"what": "GPU busy ms per step", "value": f"{p['gpu_busy_ms_per_step']:.1f}"},
             {"what": "kernels per step", "value": f"{p['kernels_per_step']:.0f}"}]
    for wanted, label, kw in ((a.peft_casts, "with peft's input casts", {"peft_casts": True}),
                              (a.before, "before issue 20", {"before": True})):
        if wanted:
            del step
            step = training_step(a.family, a.preset, res, a.batch, "cuda", **kw)
            vp = profile(step)
            rows += [{"what": f"{label}: steps/s", "value": f"{1 / timed(step, 20, 'cuda', warmup=3):.2f}"},
                     {"what": f"{label}: GPU busy ms per step", "value": f"{vp['gpu_busy_ms_per_step']:.1f}"},
                     {"what": f"{label}: kernels per step", "value": f"{vp['kernels_per_step']:.0f}"}]
    del step
    if a.compile:
        cstep = training_step(a.family, a.preset, res, a.batch, "cuda", compile=True)
        t0 = time.perf_counter()
        cstep()
        torch.cuda.synchronize()
        rows.append({"what": "compile: first step s", "value": f"{time.perf_counter() - t0:.0f}"})
        cdt = timed(cstep, 20, "cuda", warmup=3)
        rows.append({"what": "compiled steps/s", "value": f"{1 / cdt:.2f}"})
    report(f"profile_{a.family}_{a.preset}_b{a.batch}", rows, {"resolution": res})


if __name__ == "__main__":
    main()
