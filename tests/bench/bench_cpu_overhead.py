"""Benchmark 1: the engine's steps/second against a minimal hand-written peft loop on the same tiny
model and data, and against that loop encoding images and captions every step (as diffusers'
reference LoRA script does: open and resize the image file, run the VAE and the text encoder).
The images are photo-sized files (512 px) trained at 64 px; bench_encode_cost.py measures the
full-size encoders. Run: .venv/bin/python tests/bench/bench_cpu_overhead.py [--steps N]"""
import argparse
import random
import tempfile
import time
from pathlib import Path

from common import report

import torch
import torch.nn.functional as F


def minimal_loop(data_dir: Path, steps: int, encode_every_step: bool) -> float:
    """The smallest honest LoRA loop: peft adapter on the UNet, AdamW, MSE on epsilon."""
    from trainer.adapters import add_adapter, adapter_parameters
    from trainer.config import NetworkConfig
    from trainer.data.images import fit, open_image, to_tensor
    from trainer.encode import encode_text
    from trainer.models.load import load_base

    m = load_base("tiny-random")
    add_adapter(m.unet, NetworkConfig(rank=4, alpha=4))
    opt = torch.optim.AdamW(adapter_parameters(m.unet), lr=1e-3)
    sched = m.noise_scheduler()
    files = sorted(data_dir.glob("*.png"))
    scale = m.vae.config.scaling_factor

    def encode(i):  # what the reference script's data loader and step do for every example
        image = to_tensor(fit(open_image(files[i]), (64, 64), "crop")[0])
        caption = files[i].with_suffix(".txt").read_text()
        with torch.no_grad():
            lat = m.vae.encode(image[None]).latent_dist.sample() * scale
            emb, _ = encode_text(m, [caption], "cpu")
        return lat, emb

    cached = None if encode_every_step else [encode(i) for i in range(len(files))]
    rng = random.Random(0)
    m.unet.train()

    def step():
        i = rng.randrange(len(files))
        lat, emb = encode(i) if encode_every_step else cached[i]
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (1,))
        pred = m.unet(sched.add_noise(lat, noise, t), t, emb).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter_parameters(m.unet), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    for _ in range(5):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def engine(data_dir: Path, ws: Path, steps: int, fused: bool = True) -> float:
    from trainer.config import config_from_dict
    from trainer.loop import run_job

    cfg = config_from_dict({
        "name": "bench", "model": {"base": "tiny-random"},
        "dataset": {"source": str(data_dir), "resolution": 64, "bucketing": False, "resize": "crop"},
        "network": {"rank": 4, "alpha": 4},
        "train": {"steps": steps + 5, "learning_rate": 1e-3, "mixed_precision": "fp32", "device": "cpu",
                  "fused_lora": fused},
        # the loop has no validation loss: measuring it (10 times a run by default) is not a step's cost
        "validation": {"enabled": False}, "save": {"every_n_steps": 0}})
    run = run_job(cfg, ws)
    rows = run.metrics()[5:]  # the same warm-up as the loop
    return (len(rows) - 1) / (rows[-1]["time"] - rows[0]["time"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from trainer.data.demo import make_demo_dataset

    tmp = Path(tempfile.mkdtemp())
    data = make_demo_dataset(tmp / "data", count=8, size=512)  # photo-sized files, trained at 64 px
    results = {"engine": [], "engine, train.fused_lora off": [], "minimal peft loop": [],
               "loop, encoding every step": []}
    for r in range(a.repeats):  # interleaved, so machine noise hits all alike
        results["engine"].append(engine(data, tmp / f"ws{r}", a.steps))
        results["engine, train.fused_lora off"].append(engine(data, tmp / f"wsp{r}", a.steps, fused=False))
        results["minimal peft loop"].append(minimal_loop(data, a.steps, False))
        results["loop, encoding every step"].append(minimal_loop(data, a.steps, True))
    best = {k: max(v) for k, v in results.items()}
    base = best["minimal peft loop"]
    rows = [{"variant": k, "steps/s (best of %d)" % a.repeats: f"{v:.2f}", "vs minimal loop": f"{(v / base - 1) * 100:+.1f}%"}
            for k, v in best.items()]
    report("cpu_overhead", rows, {"steps": a.steps, "model": "tiny-random, 512 px PNGs trained at 64 px, rank 4, batch 1, fp32",
                                  "engine_overhead_pct": round((1 - best["engine"] / base) * 100, 1),
                                  "caching_speedup": round(best["engine"] / best["loop, encoding every step"], 2),
                                  "all": results})


if __name__ == "__main__":
    main()
