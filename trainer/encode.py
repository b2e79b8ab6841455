"""Captions → text embeddings, and images → latents, the way each model family expects them."""
from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(model, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings [B, 77, D], pooled embeddings [B, D2] for SDXL else None)."""
    embeds, pooled = [], None
    for tok, te in zip(model.tokenizers, model.text_encoders):
        hidden, pooled = _encoded(model, tok, te, captions, device)
        embeds.append(hidden)
    return torch.cat(embeds, dim=-1), pooled


def _encoded(model, tok, te, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text encoder's part: (its embeddings, SDXL's pooled output from it or None)."""
    if not model.is_xl:
        return te(tokenize(tok, captions).to(device))[0], None
    out = te(tokenize(tok, captions).to(device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # SDXL conditions on the penultimate layer; the last encoder's pooled


def encode_text_in_turn(model, captions: list[str], device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """encode_text of each caption (one at a time, so the numbers are those of encode_text([caption])), with
    the text encoders brought to `device` one after the other and sent back to the CPU: the card holds one
    (SDXL's second, 2.6 GB in fp32) instead of both (3.3 GB)."""
    parts: list[list] = [[] for _ in captions]
    pooled: list = [None] * len(captions)
    for tok, te in zip(model.tokenizers, model.text_encoders):
        te.to(device)
        try:
            for n, cap in enumerate(captions):
                hidden, last = _encoded(model, tok, te, [cap], device)
                parts[n].append(hidden.cpu())
                pooled[n] = None if last is None else last.cpu()
        finally:
            te.to("cpu")
    return [(torch.cat(p, dim=-1), pooled[n]) for n, p in enumerate(parts)]


def vae_shift_scale(vae) -> tuple[float, float]:
    return float(getattr(vae.config, "shift_factor", None) or 0.0), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] → (mean, std) of the latent distribution, unscaled."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sdxl_time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)
