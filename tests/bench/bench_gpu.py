"""Benchmark 4 (GPU): full-size SD 1.5 and SDXL UNets built from the shipped configs with random
weights (no download), a rank-16 LoRA, each preset's settings: steps/second, peak accelerator
memory, and model FLOPs utilisation against the card's bf16 peak.

Run on a machine with a GPU: .venv/bin/python tests/bench/bench_gpu.py [--peak-tflops 989]
(`--family tiny --device cpu` runs the same code on the tiny model, to check the script itself.)
The step is the engine's: its adapter, optimizer, precision and checkpointing code; latents and
text embeddings are random tensors of the real shapes, as the engine reads them from its cache.
"""
import argparse

from common import report, timed

import torch

CASES = [  # (label, family, preset, resolution, batch)
    ("SD 1.5, 512 px, batch 1", "sd15", "sd15-8gb", 512, 1),
    ("SD 1.5, 512 px, batch 4", "sd15", "sd15-8gb", 512, 4),
    ("SD 1.5, 512 px, batch 4", "sd15", "sd15-12gb", 512, 4),
    ("SDXL, 1024 px, batch 1", "sdxl", "sdxl-12gb", 1024, 1),
    ("SDXL, 1024 px, batch 1", "sdxl", "sdxl-24gb", 1024, 1),
]


def build_unet(family: str, device):
    from diffusers import UNet2DConditionModel

    from trainer.models.load import config_folder
    from trainer.models.tiny import build_tiny

    if family == "tiny":
        return build_tiny()["unet"].to(device)
    with torch.device(device):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder(family) / "unet"))


def step_inputs(unet, res: int, batch: int, scale: int, device):
    """Random latents, timesteps, text embeddings (and SDXL's extra conditioning) of the real shapes."""
    lat = torch.randn(batch, 4, res // scale, res // scale, device=device)
    emb = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    extra = None
    if unet.config.addition_embed_type == "text_time":
        extra = {"text_embeds": torch.randn(batch, 1280, device=device),
                 "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device, dtype=torch.float32)}
    t = torch.randint(0, 1000, (batch,), device=device)
    return lat, t, emb, extra


def lora_unet(family: str, preset: str, device: str, dtype, peft_casts: bool = False, over: dict | None = None,
              wrap: bool = True):
    """The engine's UNet for a preset (and `over`, config changes): frozen weights in `dtype` or stored as
    model.weight_dtype says, a rank-16 adapter in fp32, checkpointing and offloading as the engine sets them
    (`wrap=False` leaves those to `engine_wrap`, for a caller that swaps the weights first)."""
    from trainer.adapters import adapter_parameters, add_adapter, skip_input_casts
    from trainer.base_weights import store_weights
    from trainer.config import resolve
    from trainer.prepare import cast, fast_paths, storage_dtype

    cfg = resolve(preset, extra=over or {})
    unet = build_unet(family, device)
    cast(unet, device, dtype)
    unet.requires_grad_(False)
    cfg.network.rank = 16
    add_adapter(unet, cfg.network)
    if dtype != torch.float32 and not peft_casts:
        skip_input_casts(unet, cfg.network.algorithm)
    for p in adapter_parameters(unet):
        p.data = p.data.float()
    storage = storage_dtype(cfg, dtype)
    if storage:
        store_weights(unet, storage, dtype)
    fast_paths(cfg, unet, dtype, log=lambda line: None)
    if wrap:
        engine_wrap(unet, cfg, device)
    unet.train()
    return unet, cfg


def engine_wrap(unet, cfg, device):
    """Gradient checkpointing at the config's depth, and with train.offload=blocks the offloader (returned)."""
    from trainer.checkpointing import units, wrap_units
    from trainer.offload import BlockOffloader

    t = cfg.train
    if t.offload == "blocks":
        off = BlockOffloader(units(unet, t.checkpoint_depth), device, t.offload_blocks)
        wrap_units(unet, t.checkpoint_depth, checkpointed=True, on_enter=off.enter)
        return off
    if t.gradient_checkpointing:
        wrap_units(unet, t.checkpoint_depth, checkpointed=True)
    return None


BEFORE_ISSUE_20 = {"train": {"fused_lora": False, "fast_norms": False}}  # peft's LoRA layers, autocast's norms


def training_step(family: str, preset: str, res: int, batch: int, device: str, compile: bool = False,
                  peft_casts: bool = False, before: bool = False):
    """One engine training step of a rank-16 LoRA on the UNet with the preset's settings, as a function
    (`before`: as the engine stepped before issue 20's fewer launches)."""
    from trainer.adapters import adapter_parameters
    from trainer.optim import make_optimizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    unet, cfg = lora_unet(family, preset, device, dtype, peft_casts, over=BEFORE_ISSUE_20 if before else None)
    opt = make_optimizer(cfg.train.optimizer, [{"params": adapter_parameters(unet)}], 1e-4, 0.0, torch.device(device))
    lat, t, emb, extra = step_inputs(unet, res, batch, 2 if family == "tiny" else 8, device)
    if not before:  # the loop casts the text embeddings to the compute dtype once
        emb = emb.to(dtype)
    model = torch.compile(unet) if compile else unet  # as the engine does with train.compile

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            pred = model(lat, t, emb, added_cond_kwargs=extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), lat)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(family: str, preset: str, res: int, batch: int, device: str, steps: int) -> dict:
    step = training_step(family, preset, res, batch, device)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dt = timed(step, steps, device, warmup=3)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device.startswith("cuda") else float("nan")
    return {"steps_per_s": 1 / dt, "peak_gb": peak, "tflops_per_step": flops / 1e12, "achieved_tflops": flops / dt / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--family", choices=["real", "tiny"], default="real")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100 SXM: 989)")
    a = ap.parse_args()
    rows = []
    for label, family, preset, res, batch in CASES:
        if a.family == "tiny":
            family, res = "tiny", 64
        r = measure(family, preset, res, batch, a.device, a.steps)
        rows.append({"case": label, "preset": preset, "steps/s": f"{r['steps_per_s']:.2f}",
                     "peak GB": f"{r['peak_gb']:.2f}", "MFU": f"{100 * r['achieved_tflops'] / a.peak_tflops:.1f}%"})
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    report("gpu" if a.family == "real" else "gpu_smoke_tiny", rows, {"peak_tflops_bf16": a.peak_tflops})


if __name__ == "__main__":
    main()
