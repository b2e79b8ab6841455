"""LoRA files from a run's checkpoints, to compare steps and pick the best one."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import _dirs, load_checkpoint
from .config import load
from .errors import LoraLabError
from .export import kohya_key, save_file_atomic

PEFT_TO_FILE = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}


def state_to_file_tensors(adapter: dict[str, torch.Tensor], algorithm: str, alpha: float) -> dict[str, torch.Tensor]:
    """A checkpoint's peft adapter state → the tensors of a LoRA file, without loading the base model."""
    if algorithm == "oft":
        raise LoraLabError("OFT checkpoints need the base model to be turned into files.",
                           "Compare the final OFT file instead, or use a LoRA-family algorithm.")
    sdxl = any(k.startswith("te1.") for k in adapter)
    prefixes = {"unet": "lora_unet_", "te0": "lora_te1_" if sdxl else "lora_te_", "te1": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for key, t in adapter.items():
        part, _, rest = key.partition(".")
        for suffix in (*PEFT_TO_FILE, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                       "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if rest.endswith("." + suffix):
                name = kohya_key(prefixes[part], rest[: -len(suffix) - 1])
                if suffix == "lora_magnitude_vector":  # peft: (out,) or a conv's (1, out, 1, 1); files: (out, 1[, 1, 1])
                    t = t.reshape(-1, *[1] * (t.dim() - 1 if t.dim() > 1 else 1))
                file_alpha = alpha
                if suffix == "hada_w1_a":  # as export does: alpha/rank in the weights, alpha = rank
                    rank = adapter[key.replace("hada_w1_a", "hada_w1_b")].shape[0]
                    t, file_alpha = t * (alpha / rank), float(rank)
                out[f"{name}.{PEFT_TO_FILE.get(suffix, suffix)}"] = t
                if f"{name}.alpha" not in out or suffix == "hada_w1_a":
                    out[f"{name}.alpha"] = torch.tensor(float(file_alpha))
                break
    return out


def checkpoint_loras(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, LoRA file) for every checkpoint of a run, writing each file once."""
    run_dir = Path(run_dir)
    cfg = load(run_dir / "config.yaml")
    if cfg.network.algorithm == "lokr":
        raise LoraLabError("LoKr checkpoints can't be compared step by step yet.", "Compare final files instead.")
    out = []
    for ck in _dirs(run_dir / "checkpoints"):
        path = ck / "lora.safetensors"
        if not path.exists():
            adapter, _, _ = load_checkpoint(ck)
            tensors = state_to_file_tensors(adapter, cfg.network.algorithm, cfg.network.alpha)
            save_file_atomic(tensors, path, {"ss_network_dim": str(cfg.network.rank)}, "fp32")
        out.append((int(ck.name.split("-")[1]), path))
    if not out:
        raise LoraLabError("This run has no checkpoints.", "Set save.every_n_steps to keep checkpoints.")
    return out
