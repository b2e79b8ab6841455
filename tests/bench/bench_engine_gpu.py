"""Benchmark 4c (GPU): the whole engine, end to end, against diffusers' reference LoRA training loop.

Both train the same full-size random-weight model folder (random_model.py: the real shapes and the
real loading code, no download) on the same photo-sized images, with a rank-16 LoRA on the
attention layers and each preset's optimizer, precision and gradient checkpointing:
- engine: `trainer.loop.run_job`, exactly what `python -m trainer train` and the app run (loading,
  latent and text caching, the loop, checkpoint and export). Steps/second from its metrics after
  the warm-up; its own report of peak memory while training (caching is over by then), and the
  most the allocator reserved over the whole run (closer to what nvidia-smi shows, less the ~0.5 GB
  CUDA context).
- diffusers reference: the step of diffusers' examples/text_to_image/train_text_to_image_lora(_sdxl).py
  (VAE and text encoders run every step, as there; SDXL's VAE in fp32, as there; the loss read
  every step for its progress bar; torch AdamW or bitsandbytes AdamW8bit), with the images already
  decoded into memory, which flatters it.

    python tests/bench/bench_engine_gpu.py [--steps 120] [--cases sd15-8gb-b1,sdxl-12gb-b1]
Model folders are made once in --models (default /tmp/lora-lab-models).
"""
import argparse
import tempfile
import time
from pathlib import Path

from common import report
from random_model import make_random_model

import torch
import torch.nn.functional as F

CASES = {  # name: (family, preset, resolution, batch)
    "sd15-8gb-b1": ("sd15", "sd15-8gb", 512, 1),
    "sd15-8gb-b4": ("sd15", "sd15-8gb", 512, 4),
    "sd15-12gb-b4": ("sd15", "sd15-12gb", 512, 4),
    "sdxl-12gb-b1": ("sdxl", "sdxl-12gb", 1024, 1),
    "sdxl-24gb-b1": ("sdxl", "sdxl-24gb", 1024, 1),
    # issue 19's small cards: the presets, and SDXL with everything turned down (blocks offloaded too)
    "sdxl-6gb-b1": ("sdxl", "sdxl-6gb", 1024, 1),
    "sd15-4gb-b1": ("sd15", "sd15-4gb", 512, 1),
    "sdxl-min-b1": ("sdxl", "sdxl-6gb", 1024, 1, {"train": {"offload": "blocks"}}),
    "sdxl-12gb-fp8-b1": ("sdxl", "sdxl-12gb", 1024, 1, {"model": {"weight_dtype": "fp8_e4m3fn"}}),
    # issue 20: the engine compiled whatever the run's length (`auto` compiles runs of 2,000 steps and more); the
    # first step's compile is inside the warm-up steps, so steps/s is the compiled step's
    "sd15-8gb-b1-compiled": ("sd15", "sd15-8gb", 512, 1, {"train": {"compile": "on"}}),
    "sdxl-12gb-b1-compiled": ("sdxl", "sdxl-12gb", 1024, 1, {"train": {"compile": "on"}}),
}
WARMUP = 20
GB = 1024**3
DEVICE = "cuda"


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(kind: str = "allocated") -> float:
    if DEVICE != "cuda":
        return float("nan")
    return getattr(torch.cuda, f"max_memory_{kind}")() / GB


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def images(folder: Path, res: int, count: int = 16) -> Path:
    from trainer.data.demo import make_demo_dataset

    if not any(folder.glob("*.png")):
        make_demo_dataset(folder, count=count, size=res)
    return folder


def settings(model: Path, data: Path, res: int, batch: int, steps: int) -> dict:
    return {"name": "bench", "model": {"base": str(model)},
            "dataset": {"source": str(data), "resolution": res, "bucketing": False, "resize": "crop"},
            "network": {"rank": 16},
            "train": {"steps": steps, "batch_size": batch, "device": DEVICE},
            "save": {"every_n_steps": 0}, "sample": {"prompts": [], "every_n_steps": 0}}


def engine(model: Path, data: Path, preset: str, res: int, batch: int, steps: int, over: dict | None = None,
           family: str = "sd15") -> dict:
    from trainer.config import merge, resolve
    from trainer.loop import run_job
    from trainer.memory_plan import phases

    cfg = resolve(preset, extra=merge(settings(model, data, res, batch, steps), over or {}))
    reset_peak()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as ws:
        run = run_job(cfg, Path(ws))
        rows, status = run.metrics(), run.status()
    first, last = next(r for r in rows if r["step"] == WARMUP), rows[-1]
    return {"steps_per_s": (last["step"] - WARMUP) / (last["time"] - first["time"]), "wall_s": time.time() - t0,
            "peak_train_gb": (status.get("peak_memory") or float("nan")) / GB,
            # the meter resets the allocator's peaks at each phase: its own record has the whole run's
            "reserved_gb": max((status.get("reserved_by_phase") or {}).values(), default=float("nan") * GB) / GB,
            "by_phase": status.get("memory_by_phase"), "reserved_by_phase": status.get("reserved_by_phase"),
            "estimate_by_phase": phases(cfg, family)}


def reference(model: Path, data: Path, preset: str, res: int, batch: int, steps: int) -> dict:
    """diffusers' train_text_to_image_lora(_sdxl).py training step, its options set as the preset's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig

    from trainer.config import resolve
    from trainer.data.images import fit, open_image, to_tensor
    from trainer.models.load import load_base

    cfg = resolve(preset, extra=settings(model, data, res, batch, steps))
    AcceleratorState._reset_state()  # the engine's run made one already
    wd = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    acc = Accelerator(mixed_precision="bf16" if DEVICE == "cuda" else "no", cpu=DEVICE == "cpu")
    dev = acc.device
    m = load_base(str(model))
    xl = m.family == "sdxl"
    m.unet.requires_grad_(False)
    m.vae.requires_grad_(False)
    m.unet.to(dev, dtype=wd)
    m.vae.to(dev, dtype=torch.float32 if xl else wd)  # the SDXL script keeps the VAE in fp32 (NaNs in fp16)
    tes = m.text_encoders
    for te in tes:
        te.requires_grad_(False)
        te.to(dev, dtype=wd)
    m.unet.add_adapter(LoraConfig(r=16, lora_alpha=cfg.network.alpha, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in m.unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # cast_training_params(unet, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
    if cfg.train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    unet, opt = acc.prepare(m.unet, opt)
    sched = m.noise_scheduler()
    files = sorted(data.glob("*.png"))
    pixels = torch.stack([to_tensor(fit(open_image(f), (res, res), "crop")[0]) for f in files])
    ids = [tok([files[0].with_suffix(".txt").read_text()] * batch, padding="max_length", max_length=77, truncation=True,
               return_tensors="pt").input_ids.to(dev) for tok in m.tokenizers]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * batch, device=dev, dtype=wd)
    unet.train()

    def step(i):
        pix = pixels[torch.arange(i * batch, (i + 1) * batch) % len(pixels)].to(dev)
        with acc.accumulate(unet):
            lat = m.vae.encode(pix.to(m.vae.dtype)).latent_dist.sample() * m.vae.config.scaling_factor
            lat = lat.to(wd)
            noise = torch.randn_like(lat)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=dev).long()
            noisy = sched.add_noise(lat, noise, t)
            if xl:
                out1 = tes[0](ids[0], output_hidden_states=True)
                out2 = tes[1](ids[1], output_hidden_states=True)
                emb = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                extra = {"text_embeds": out2[0], "time_ids": time_ids}
            else:
                emb, extra = tes[0](ids[0], return_dict=False)[0], None
            pred = unet(noisy, t, emb, added_cond_kwargs=extra, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            acc.gather(loss.repeat(batch)).mean().item()  # the script's train_loss, every step
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()

    reset_peak()
    for i in range(WARMUP):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(WARMUP, steps):
        step(i)
    sync()
    return {"steps_per_s": (steps - WARMUP) / (time.perf_counter() - t0), "peak_train_gb": peak()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "lora-lab-models")
    ap.add_argument("--reference", default="all", help="the cases that also run the reference: all, none or a list")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, to check this script")
    a = ap.parse_args()
    global DEVICE
    DEVICE = "cpu" if a.smoke else "cuda"
    rows, raw = [], {}
    for name in a.cases.split(","):
        family, preset, res, batch, *over = CASES[name]
        if a.smoke:
            res = 64
        if a.smoke:
            from trainer.models.tiny import save_tiny

            kind = "tiny-random-xl" if family == "sdxl" else "tiny-random"
            model = a.models / kind
            if not model.exists():
                save_tiny(model, kind)
        else:
            model = make_random_model(family, a.models / family, "cuda")
        data = images(a.models / f"images{res}", res)
        e = engine(model, data, preset, res, batch, a.steps, over[0] if over else None, family)
        with_ref = a.reference == "all" or name in a.reference.split(",")
        r = reference(model, data, preset, res, batch, a.steps) if with_ref else None
        raw[name] = {"engine": e, "reference": r}
        rows.append({"case": f"{family} {res}px b{batch}", "preset": preset + (f" {over[0]}" if over else ""),
                     "engine steps/s": f"{e['steps_per_s']:.2f}",
                     "reference steps/s": f"{r['steps_per_s']:.2f}" if r else "—",
                     "engine vs reference": f"{(e['steps_per_s'] / r['steps_per_s'] - 1) * 100:+.0f}%" if r else "—",
                     "engine peak GB (allocated / reserved)": f"{e['peak_train_gb']:.2f} / {e['reserved_gb']:.2f}",
                     "reference peak GB": f"{r['peak_train_gb']:.2f}" if r else "—"})
        print(rows[-1], flush=True)
        reset_peak()
    report("engine_gpu_smoke" if a.smoke else "engine_gpu", rows, {"steps": a.steps, "warmup_steps": WARMUP, "rank": 16, "raw": raw})


if __name__ == "__main__":
    main()
