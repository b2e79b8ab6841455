"""Benchmark 4b (no GPU needed): peak accelerator memory of each preset's training step on the full-size
SD 1.5 and SDXL UNets, and of a sample image during training, estimated on any machine.

The step is the engine's (its cast, peft adapter, gradient checkpointing, rank 16, bf16 autocast) and
runs under PyTorch's FakeTensorMode: every operation computes its output's shape and dtype but no
numbers, so SDXL at 1024 px takes seconds on a laptop. The fake tensors are CPU tensors (a CPU-only
PyTorch cannot run autograd on fake CUDA ones), under the CPU's autocast with CUDA's fp32 norms. Each
tensor's storage is counted from its creation until it is freed; the peak is what
`torch.cuda.max_memory_allocated()` would report, rounded to the CUDA allocator's 512-byte blocks.
Not counted: the CUDA context (~0.3-0.5 GB, outside PyTorch's counters too), cuBLAS/cuDNN
workspaces and allocator fragmentation. Optimizer state is counted from its size per weight
(AdamW: two fp32 moments; 8-bit AdamW: two 8-bit moments plus a float per 256-value block): the
8-bit optimizer's kernels cannot run on fake tensors.

    .venv/bin/python tests/bench/bench_memory.py            # the five cases of bench_gpu.py
    .venv/bin/python tests/bench/bench_memory.py --check    # also the tiny model on the CPU, measured
                                                            # for real and estimated, to check the method
On a GPU, bench_gpu.py measures the same cases for real.
"""
import argparse
import time
import weakref
from contextlib import contextmanager, nullcontext

from bench_gpu import CASES, engine_wrap, lora_unet, step_inputs as inputs
from common import report

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GB = 1024**3
SMALL = {"train": {"offload": "blocks"}}  # SDXL with everything turned down
MEMORY_CASES = [(*c, {}) for c in CASES] + [
    ("SDXL, 1024 px, batch 1", "sdxl", "sdxl-6gb", 1024, 1, {}),
    ("SD 1.5, 512 px, batch 1", "sd15", "sd15-4gb", 512, 1, {}),
    ("SDXL, 1024 px, batch 1, blocks offloaded", "sdxl", "sdxl-6gb", 1024, 1, SMALL),
    ("SDXL, 1024 px, batch 1, layer checkpoints", "sdxl", "sdxl-6gb", 1024, 1, {"train": {"checkpoint_depth": "layer"}}),
    ("SD 1.5, 512 px, batch 1, layer checkpoints", "sd15", "sd15-4gb", 512, 1, {"train": {"checkpoint_depth": "layer"}}),
]
OPT_BYTES = {"adamw": 8.0, "adamw8bit": 2 + 8 / 256}  # state bytes per trained weight


class PeakMemory(TorchDispatchMode):
    """Live tensor storage bytes, counted from the operations that create storages."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()
        self.ops: set[str] = set()

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if id(st) in self.seen:
            return
        n = -(-st.nbytes() // 512) * 512
        self.seen.add(id(st))
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, id(st), n)

    def _free(self, key: int, n: int) -> None:
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


@contextmanager
def cuda_autocast_norms():
    """CUDA's autocast runs group_norm and layer_norm in fp32 (their outputs, kept for the next layer's
    backward, are fp32 on a GPU); the CPU's autocast runs them in bf16. This applies CUDA's rule
    wherever CPU autocast is on, the backward pass's recomputed checkpoints included (a function
    patched, as the recomputation runs outside Python's torch-function modes). For the rest of the
    UNet (convolutions, matmuls, attention in bf16) the two autocasts agree."""
    F = torch.nn.functional
    originals = {"group_norm": F.group_norm, "layer_norm": F.layer_norm}

    def in_fp32(func):
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return func(*args, **kwargs)
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kw = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*up, **kw)
        return run

    for name, func in originals.items():
        setattr(F, name, in_fp32(func))
    try:
        yield
    finally:
        for name, func in originals.items():
            setattr(F, name, func)


def to_fake(module: torch.nn.Module, mode: FakeTensorMode, device: torch.device) -> None:
    """Meta weights → fake tensors on `device` (module.to cannot convert into fake tensors)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(FakeTensor(mode, p.data, device), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = FakeTensor(mode, b, device)


def step_peak(unet, res: int, batch: int, scale: int, device, autocast, tracker: PeakMemory) -> None:
    for t in [*unet.parameters(), *unet.buffers()]:
        tracker.add(t)
    with tracker:
        lat, t, emb, extra = inputs(unet, res, batch, scale, device)
        with autocast():
            pred = unet(lat, t, emb, added_cond_kwargs=extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), lat)
        loss.backward()
        del pred, loss


def estimate(family: str, preset: str, res: int, batch: int, over: dict | None = None) -> dict:
    dev = torch.device("cpu")  # fake CUDA tensors cannot take part in autograd on a CPU-only PyTorch
    unet, cfg = lora_unet(family, preset, "meta", torch.bfloat16, over=over, wrap=False)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    mode = FakeTensorMode()
    to_fake(unet, mode, dev)
    off = engine_wrap(unet, cfg, dev)  # with offload=blocks, each block "on the device" is a copy of its own
    host = off.bytes_on_host() if off else 0  # the blocks' weights in CPU memory, on a GPU not on the card
    tracker = PeakMemory()
    t0 = time.perf_counter()
    with mode, cuda_autocast_norms():
        step_peak(unet, res, batch, 2 if family == "tiny" else 8, dev,
                  lambda: torch.autocast("cpu", dtype=torch.bfloat16), tracker)
    weights = sum(-(-p.numel() * p.element_size() // 512) * 512 for p in unet.parameters()) - host
    opt = trained * OPT_BYTES[cfg.train.optimizer]
    attention = sorted(o for o in tracker.ops if "attention" in o and "backward" not in o)
    return {"peak_gb": (tracker.peak - host + opt) / GB, "weights_gb": weights / GB, "optimizer_gb": opt / GB,
            "trained": trained, "attention": attention, "seconds": time.perf_counter() - t0,
            "offloaded_gb": host / GB}


def caching_peak(family: str, res: int) -> float:
    """GB of the caching phase's VAE: its fp32 weights and the encoding of one image at `res`, no gradients."""
    from diffusers import AutoencoderKL

    from trainer.models.load import config_folder

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder(family) / "vae"))
    mode, dev = FakeTensorMode(), torch.device("cpu")
    to_fake(vae, mode, dev)
    tracker = PeakMemory()
    for t in [*vae.parameters(), *vae.buffers()]:
        tracker.add(t)
    with mode, torch.no_grad(), tracker:
        vae.encode(torch.randn(1, 3, res, res)).latent_dist.mean
    return tracker.peak / GB


def sampling_peak(family: str, res: int, unet_gb: float, state_gb: float) -> dict:
    """A sample image during training at `res` on a bf16 card: the UNet (`unet_gb` of it on the card) with its
    LoRA and optimizer state stay; the text encoders (bf16) come for the prompts and leave; then the VAE (bf16
    once latents are cached) joins, with the larger of a denoising step (batch 2 for guidance, no gradients)
    and its decode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.load import config_folder

    folder = config_folder(family)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if (folder / "text_encoder_2").exists():
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    te_gb = sum(p.numel() * 2 for te in encoders for p in te.parameters()) / GB
    vae_gb = sum(p.numel() * 2 for p in vae.parameters()) / GB
    mode, dev, side = FakeTensorMode(), torch.device("cpu"), res // 8
    unet.to(torch.bfloat16)
    vae.to(torch.bfloat16)
    to_fake(vae, mode, dev)
    to_fake(unet, mode, dev)
    def denoise():
        lat, t, emb, extra = inputs(unet, res, 2, 8, dev)
        return unet(lat, t, emb, added_cond_kwargs=extra).sample

    work = {}
    def decode():
        return vae.decode(torch.randn(1, 4, side, side, dtype=torch.bfloat16)).sample

    for name, run in {"decode": decode, "denoise": denoise}.items():  # the text encoders have left by then
        tracker = PeakMemory()
        for t in [*unet.parameters(), *unet.buffers(), *vae.parameters(), *vae.buffers()]:
            tracker.add(t)  # weights are resident, counted above; their views are not new memory
        weights = tracker.live
        with mode, cuda_autocast_norms(), torch.no_grad(), tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "denoise"):
                run()
        work[name] = (tracker.peak - weights) / GB
    # trainer/sampling.py: the text encoders come for the prompts and leave before the UNet and VAE work
    peak = unet_gb + state_gb + max(te_gb, vae_gb + max(work.values()))
    return {"peak_gb": peak, "te_vae_gb": te_gb + vae_gb, **work}


def check_on_cpu(preset: str, dtype, over: dict | None = None) -> dict:
    """The tiny model on the CPU: the tracker counting real tensors, and the fake estimate (with offloading,
    less the blocks' weights in CPU memory, in both)."""
    peaks = {}
    for kind in ("real", "fake"):
        unet, cfg = lora_unet("tiny", preset, "cpu" if kind == "real" else "meta", dtype, over=over, wrap=False)
        mode = FakeTensorMode()
        if kind == "fake":
            to_fake(unet, mode, torch.device("cpu"))
        off = engine_wrap(unet, cfg, torch.device("cpu"))
        tracker = PeakMemory()
        with mode if kind == "fake" else nullcontext(), cuda_autocast_norms():
            step_peak(unet, 64, 2, 2, torch.device("cpu"),
                      lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32), tracker)
        peaks[f"{kind}_mb"] = round((tracker.peak - (off.bytes_on_host() if off else 0)) / 1024**2, 3)
    return peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="also compare the estimate with a real CPU step")
    ap.add_argument("--cases", default="all", help="all, or numbers into MEMORY_CASES (0-based), e.g. 5,6,7")
    a = ap.parse_args()
    rows = []
    picked = range(len(MEMORY_CASES)) if a.cases == "all" else [int(n) for n in a.cases.split(",")]
    for n in picked:
        label, family, preset, res, batch, over = MEMORY_CASES[n]
        r = estimate(family, preset, res, batch, over)
        state = r["optimizer_gb"] + r["trained"] * 4 / GB  # optimizer state and the LoRA's gradients
        sample = sampling_peak(family, res, r["weights_gb"], state)
        rows.append({"case": label, "preset": preset + (f" {over}" if over else ""),
                     "caching GB (est.)": f"{caching_peak(family, res):.2f}",
                     "peak GB (est.)": f"{r['peak_gb']:.2f}",
                     "sampling peak GB (est.)": f"{sample['peak_gb']:.2f}",
                     "frozen+LoRA weights GB": f"{r['weights_gb']:.2f}", "optimizer GB": f"{r['optimizer_gb']:.3f}",
                     "in CPU memory GB": f"{r['offloaded_gb']:.2f}",
                     "LoRA weights": f"{r['trained']:,}", "attention (CPU kernel)": ",".join(r["attention"]),
                     "s": f"{r['seconds']:.0f}"})
        print(rows[-1], flush=True)
    notes = {"method": "FakeTensorMode (shapes and dtypes, no numbers) under bf16 autocast with CUDA's fp32 "
                       "norms; live storage bytes in 512-byte blocks; CUDA context, workspaces and "
                       "fragmentation not counted",
             "sampling": "a sample image during training: UNet + LoRA + optimizer state resident; the text encoders "
                         "(bf16) for the prompts, then the VAE (bf16) with the larger of a guided denoising step and "
                         "its decode",
             "caching": "the VAE in fp32 encoding one image at the training resolution, no gradients"}
    if a.check:
        notes["check_tiny_cpu"] = {f"{p} {d}": check_on_cpu(p, dt) for p in ("sd15-8gb", "sd15-12gb", "sd15-4gb")
                                   for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        notes["check_tiny_cpu"]["sd15-4gb bf16, blocks offloaded"] = check_on_cpu("sd15-4gb", torch.bfloat16, SMALL)
    report("memory_estimate", rows, notes)


if __name__ == "__main__":
    main()
