"""Captions → text embeddings, and images → latents, the way each model family expects them."""
from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(model, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings [B, 77, D], pooled embeddings [B, D2] for SDXL else None)."""
    if not model.is_xl:
        te = model.text_encoders[0]
        ids = tokenize(model.tokenizers[0], captions).to(device)
        return te(ids)[0], None
    embeds, pooled = [], None
    for tok, te in zip(model.tokenizers, model.text_encoders):
        out = te(tokenize(tok, captions).to(device), output_hidden_states=True)
        embeds.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = out[0]  # text_encoder_2's projected pooled output
    return torch.cat(embeds, dim=-1), pooled


def encode_text_in_turn(model, captions: list[str], device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """encode_text of each caption (one at a time, so the numbers are those of encode_text([caption])), with
    the text encoders brought to `device` one after the other and sent back to the CPU: the card holds one
    (SDXL's second, 2.6 GB in fp32) instead of both (3.3 GB)."""
    parts: list[list] = [[] for _ in captions]
    pooled: list = [None] * len(captions)
    for i, (tok, te) in enumerate(zip(model.tokenizers, model.text_encoders)):
        te.to(device)
        try:
            for n, cap in enumerate(captions):
                out = te(tokenize(tok, [cap]).to(device), output_hidden_states=True)
                if model.is_xl:
                    parts[n].append(out.hidden_states[-2].cpu())  # SDXL conditions on the penultimate layer
                    pooled[n] = out[0].cpu()  # text_encoder_2's projected pooled output
                else:
                    parts[n].append(out[0].cpu())
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
