"""Benchmark (no GPU needed): the host's work per training step, as operators dispatched per step.

At batch 1 a fast GPU waits on the host, which launches one or more kernels per operator (issue 20). So
the operators a training step dispatches (forward, backward, optimizer step) are counted on the full-size
SD 1.5 and SDXL UNets, with the engine's adapter, precision and checkpointing per preset, under PyTorch's
fake tensors (shapes, no numbers: the count does not depend on the resolution, so SDXL takes seconds on a
CPU), before issue 20's changes (train.fused_lora and train.fast_norms off, fp32 text embeddings) and now.
Forward, backward and optimizer count the operators that launch work (not views or allocations). The
forward's are also counted by where they ran: inside a peft adapter layer's own part (its adapter maths,
casts, dropout, scaling: everything but the base layer) or elsewhere; the fused path runs none there. On a GPU, profile_step.py
counts the kernels themselves.

    .venv/bin/python tests/bench/bench_host_ops.py [--presets sd15-8gb,sdxl-12gb]
"""
import argparse
from collections import Counter

from bench_gpu import BEFORE_ISSUE_20, lora_unet, step_inputs
from bench_memory import cuda_autocast_norms, to_fake
from common import report

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

FAMILY = {"sd15-8gb": "sd15", "sd15-12gb": "sd15", "sd15-4gb": "sd15", "sdxl-12gb": "sdxl", "sdxl-24gb": "sdxl",
          "sdxl-6gb": "sdxl"}
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
         "reshape", "alias", "as_strided", "detach", "split", "split_with_sizes", "chunk", "unbind",
         "empty", "new_empty", "empty_strided"}  # no kernel on a GPU (views, and allocations)
METADATA = {"device", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "is_contiguous",
            "_record_function_enter_new", "_record_function_exit"}  # no work at all (profiler marks)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.where = Counter(), Counter()
        self.in_adapter = self.launching = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in METADATA:  # questions about a tensor (its device, its sizes): no work on a GPU
            self.ops[name] += 1
            if name not in VIEWS:
                self.where["adapter" if self.in_adapter else "other"] += 1
                self.launching += 1
        return func(*args, **(kwargs or {}))


def mark_adapter_parts(unet, counter: OpCounter) -> None:
    """Count what runs inside a peft adapter layer but outside its base layer as the adapter's (the fused path
    calls the base layers itself, from no adapter layer)."""
    from trainer.adapters import adapter_layers

    inside_base = []

    def base_enter(*_):
        inside_base.append(counter.in_adapter > 0)
        counter.in_adapter -= inside_base[-1]

    def base_leave(*_):
        counter.in_adapter += inside_base.pop()

    for _, layer in adapter_layers(unet):
        base = layer.get_base_layer()
        layer.register_forward_pre_hook(lambda *a: setattr(counter, "in_adapter", counter.in_adapter + 1))
        layer.register_forward_hook(lambda *a: setattr(counter, "in_adapter", counter.in_adapter - 1))
        base.register_forward_pre_hook(base_enter)
        base.register_forward_hook(base_leave)


def count(preset: str, fast: bool, targets: str = "") -> dict:
    family = FAMILY[preset]
    dev = torch.device("cpu")
    over = {**({} if fast else BEFORE_ISSUE_20), **({"network": {"targets": targets}} if targets else {})}
    unet, cfg = lora_unet(family, preset, "meta", torch.bfloat16, wrap=False, over=over)
    mode = FakeTensorMode()
    to_fake(unet, mode, dev)
    from bench_gpu import engine_wrap

    engine_wrap(unet, cfg, dev)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    counter = OpCounter()
    mark_adapter_parts(unet, counter)
    phases = {}
    with mode, cuda_autocast_norms():
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as the engine's adamw on a GPU
        lat, t, emb, extra = step_inputs(unet, 256, 1, 8, dev)
        if fast:  # the loop now casts the text embeddings once (autocast would at each k and v)
            emb = emb.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a first step: the optimizer makes its state
            first = unet(lat, t, emb, added_cond_kwargs=extra).sample
        torch.nn.functional.mse_loss(first.float(), lat).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del first
        with counter:  # the second step, as every later one
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(lat, t, emb, added_cond_kwargs=extra).sample
            phases["forward"] = counter.launching
            adapter_fwd = counter.where["adapter"]
            torch.nn.functional.mse_loss(pred.float(), lat).backward()
            phases["backward"] = counter.launching - phases["forward"]
            opt.step()
            opt.zero_grad(set_to_none=True)
    total, kernels = sum(counter.ops.values()), counter.launching
    return {"preset": preset, "targets": cfg.network.targets, "family": family,
            "fused LoRA, bf16 norms": "yes" if fast else "no (before)",
            "operators": total, "without views": kernels,
            "forward": phases["forward"], "backward": phases["backward"],
            "optimizer": kernels - phases["forward"] - phases["backward"],
            "in peft's adapter layers (forward)": adapter_fwd, "adapter layers": len(params) // 2,
            "top": counter.ops.most_common(8)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="sd15-8gb,sdxl-12gb")
    ap.add_argument("--targets", default="", help="network.targets instead of the presets' (attention)")
    a = ap.parse_args()
    rows = []
    for preset in a.presets.split(","):
        for fast in (False, True):
            r = count(preset, fast, a.targets)
            rows.append({k: (f"{v:,}" if isinstance(v, int) else v) for k, v in r.items() if k != "top"})
            print(r["top"], flush=True)
    method = ("aten operators dispatched in a second training step (forward, backward, fused AdamW step as the "
              "engine runs it on a GPU) under FakeTensorMode and CPU bf16 autocast with CUDA's fp32 norms; views and "
              "allocations need no kernel on a GPU; metadata queries (device, sizes) not counted")
    report("host_ops" + (f"_{a.targets}" if a.targets else ""), rows, {"method": method})


if __name__ == "__main__":
    main()
