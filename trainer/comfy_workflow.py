"""A ComfyUI workflow (API format) that loads the same base model and LoRA and makes the exported
images again: one chain per prompt, from the same seed, steps, guidance, sampler and size.

The API format is what ComfyUI's "Export (API)" writes and what its `/prompt` endpoint and "Load"
(drag the file onto the canvas) accept. ComfyUI draws its starting noise differently from diffusers,
so the pictures match in content, not pixel for pixel.
"""
from __future__ import annotations

from pathlib import PurePath

# LoRA Lab's sampler names → ComfyUI's KSampler sampler_name (all with the "normal" schedule).
SAMPLERS = {"euler_a": "euler_ancestral", "euler": "euler", "ddim": "ddim", "dpmpp_2m": "dpmpp_2m"}


def api_workflow(base: str, prompts: list[str], negative: str, seed: int, steps: int, guidance: float,
                 width: int, height: int, sampler: str, loras: list[tuple[str, float]]) -> dict:
    """`loras`: (file name as it lies in ComfyUI's models/loras, strength). `base`: the checkpoint's file
    name as it lies in models/checkpoints."""
    g: dict = {}

    def node(kind: str, **inputs) -> list:
        key = str(len(g) + 1)
        g[key] = {"class_type": kind, "inputs": inputs, "_meta": {"title": kind}}
        return [key, 0]

    ckpt = node("CheckpointLoaderSimple", ckpt_name=PurePath(base).name)
    model, clip, vae = ckpt, [ckpt[0], 1], [ckpt[0], 2]
    for name, strength in loras:
        lora = node("LoraLoader", lora_name=PurePath(name).name, strength_model=float(strength),
                    strength_clip=float(strength), model=model, clip=clip)
        model, clip = lora, [lora[0], 1]
    neg = node("CLIPTextEncode", text=negative or "", clip=clip)
    latent = node("EmptyLatentImage", width=int(width), height=int(height), batch_size=1)
    for i, prompt in enumerate(prompts):
        pos = node("CLIPTextEncode", text=prompt, clip=clip)
        sampled = node("KSampler", seed=int(seed), steps=int(steps), cfg=float(guidance),
                       sampler_name=SAMPLERS.get(sampler, "euler"), scheduler="normal", denoise=1.0,
                       model=model, positive=pos, negative=neg, latent_image=latent)
        pixels = node("VAEDecode", samples=sampled, vae=vae)
        node("SaveImage", filename_prefix=f"lora-lab_{i:02d}", images=pixels)
    return g
