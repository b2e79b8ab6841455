"""Resumable checkpoints, written atomically: a folder is complete or it does not exist.

checkpoints/step-000100/ holds adapter.safetensors, training_state.pt (optimizer, LR scheduler,
grad scaler, RNG states) and state.json (step, data position, seed). Written under a temporary
name and renamed, so a crash or a full disk mid-write leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import LoraLabError
from .runs import removed_on_failure


def _dirs(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "state.json").exists())


def save_checkpoint(root: Path, step: int, adapter: dict, training_state: dict, info: dict, keep_last: int) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # torch.save on a full disk raises a bare RuntimeError: this tells it apart from a bug, while the disk is full
    with removed_on_failure(root, tmp):
        save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({**info, "step": step}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    for old in _dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    dirs = _dirs(Path(root))
    return dirs[-1] if dirs else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(adapter tensors, training state, info)."""
    path = Path(path)
    try:
        info = json.loads((path / "state.json").read_text())
        adapter = load_file(str(path / "adapter.safetensors"))
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise LoraLabError(f"Checkpoint {path.name} is damaged ({e}).",
                           "Delete that checkpoint folder; resume will use the one before it.")
    return adapter, state, info
