"""What the demo model draws, scored: fixed (prompt, seed) pairs through the pixel classifier."""
from __future__ import annotations

import numpy as np

from .classify import classify, score
from .shapes import BACKGROUNDS, COLORS, SHAPES, caption


def cases(n: int = 120, seed: int = 1234) -> list[tuple[str, int, tuple[str, str, str]]]:
    """`n` fixed (prompt, seed, (shape, colour, background)): every combination once, then random ones."""
    combos = [(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(combos)))
    while len(order) < n:
        order.append(int(rng.integers(len(combos))))
    return [(caption(*combos[i]), k, combos[i]) for k, i in enumerate(order[:n])]


def score_images(images, wants, with_concept: bool = False) -> dict:
    return score([(classify(img, with_concept), want) for img, want in zip(images, wants)])


def pipeline_images(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0,
                    batch: int = 64) -> list:
    """Images from a diffusers pipeline, one per (prompt, seed), batched; latents drawn on the CPU."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in ss]
        lat = torch.stack([torch.randn((4, 16, 16), generator=g) for g in gens]).to(pipe.device, pipe.unet.dtype)
        out.extend(pipe(prompt=ps, num_inference_steps=steps, guidance_scale=guidance, latents=lat,
                        generator=gens, height=64, width=64).images)
    return out


def concept_cases(n: int = 12, trigger: str = "lablora") -> list[tuple[str, int]]:
    """`n` fixed (prompt, seed) pairs asking for the demo dataset's concept: every shape on every background."""
    from ..data.demo import concept_caption

    combos = [(s, b) for b in BACKGROUNDS for s in SHAPES]
    return [(concept_caption(*combos[i % len(combos)], trigger), 100 + i) for i in range(n)]


def concept_share(images) -> float:
    """The share of pictures whose shape is drawn in the concept colour (pink), by the classifier."""
    from .shapes import CONCEPT

    return sum(classify(img, with_concept=True)["color"] == CONCEPT[0] for img in images) / max(1, len(images))


def pinkness(images) -> float:
    """How close the pictures' shapes come to the concept colour, 0 (as far as the palette's farthest
    colour) to 1 (exactly): a measure that moves smoothly with LoRA strength, unlike a count."""
    from .shapes import CONCEPT

    target = np.asarray(CONCEPT[1], np.float32)
    far = max(np.linalg.norm(np.asarray(c, np.float32) - target) for c in [*COLORS.values(), *BACKGROUNDS.values()])
    rgbs = [classify(img)["rgb"] for img in images]
    return float(np.mean([0.0 if c is None else max(0.0, 1 - np.linalg.norm(c - target) / far) for c in rgbs]))
