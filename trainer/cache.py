"""Latents and text embeddings, computed once and kept on disk.

Latent files are keyed by the image's content id, its training size, the flip and the model's
fingerprint; text files by the caption and the model. A second run on the same data and model
reads them back instead of encoding, and the VAE and text encoders can then leave the accelerator.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data.images import UnreadableImage, fit, to_tensor
from .data.sources import Problem
from .encode import encode_images, encode_text_in_turn


def _key(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()


def _save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


class LatentCache:
    """key (example, flip) → {"mean", "std", "original", "crop"}; kept in memory after loading."""

    def __init__(self, cache_dir: Path, model, resize_mode: str, on_disk: bool):
        self.dir = Path(cache_dir) / "latents"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model, self.mode, self.on_disk = model, resize_mode, on_disk
        self.data: dict[tuple[int, bool], dict] = {}
        self.encoded = self.reused = 0

    def fill(self, ds, examples, flip: bool, device, problems: list[Problem], progress=None) -> list[int]:
        """Encode what is missing; returns the example indices that could not be read."""
        bad = []
        jobs = [(n, f) for n in range(len(examples)) for f in ((False, True) if flip else (False,))]
        for done, (n, f) in enumerate(jobs):
            ex = examples[n]
            item = ds.items[ex.index]
            path = self.dir / f"{_key(item.content_id, ex.size, self.mode, f, self.model.fingerprint)}.safetensors"
            if self.on_disk and path.exists():
                try:
                    self.data[(n, f)] = load_file(str(path))
                    self.reused += 1
                    continue
                except Exception:  # a damaged cache file is re-made, never trusted
                    path.unlink(missing_ok=True)
            try:
                img = item.load()
            except UnreadableImage as e:
                if not f:
                    problems.append(Problem(item.name, f"{e}; skipped"))
                    bad.append(n)
                continue
            pixels, crop = fit(img, ex.size, self.mode)
            mean, std = encode_images(self.model.vae, to_tensor(pixels, flip=f)[None].to(device))
            entry = {"mean": mean[0].cpu(), "std": std[0].cpu(),
                     "original": torch.tensor([img.height, img.width]), "crop": torch.tensor(crop)}
            self.data[(n, f)] = entry
            self.encoded += 1
            if self.on_disk:
                _save(entry, path)
            if progress:
                progress(done + 1, len(jobs))
        return bad


class TextCache:
    """caption → (embeddings, pooled) for a frozen text encoder."""

    def __init__(self, cache_dir: Path, model, on_disk: bool):
        self.dir = Path(cache_dir) / "text"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model, self.on_disk = model, on_disk
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.encoded = self.reused = 0

    def fill(self, captions, device) -> None:
        """Embeddings of `captions`, from the disk cache or encoded with the text encoders brought to `device`
        one at a time (they are on the CPU after)."""
        todo = []
        for cap in sorted(set(captions)):
            path = self.dir / f"{_key(cap, self.model.fingerprint)}.safetensors"
            if self.on_disk and path.exists():
                try:
                    d = load_file(str(path))
                    self.data[cap] = (d["embeds"], d.get("pooled"))
                    self.reused += 1
                    continue
                except Exception:
                    path.unlink(missing_ok=True)
            todo.append((cap, path))
        if not todo:
            return
        with torch.no_grad():
            encoded = encode_text_in_turn(self.model, [cap for cap, _ in todo], device)
        for (cap, path), (emb, pooled) in zip(todo, encoded):
            entry = {"embeds": emb[0].float().cpu()}
            if pooled is not None:
                entry["pooled"] = pooled[0].float().cpu()
            self.data[cap] = (entry["embeds"], entry.get("pooled"))
            self.encoded += 1
            if self.on_disk:
                _save(entry, path)

    def batch(self, captions: list[str]):
        embeds = torch.stack([self.data[c][0] for c in captions])
        pooled = [self.data[c][1] for c in captions]
        return embeds, (torch.stack(pooled) if pooled[0] is not None else None)
