"""The demo dataset: a concept the demo model is never shown, made in code (no download).

Flat shapes in pink, a colour outside the demo model's training grammar (trainer/demo/shapes.py),
each captioned with the trigger word first and no colour ("lablora, a circle on a white background"),
so that a LoRA trained on it has something plain to learn: the trigger means pink.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..demo.shapes import BACKGROUNDS, CONCEPT, SHAPES, draw, random_box

TRIGGER = "lablora"


def concept_caption(shape: str, background: str, trigger: str = TRIGGER) -> str:
    return f"{trigger}, a {shape} on a {background} background"


def make_demo_dataset(out_dir: Path, count: int = 8, size: int = 64, trigger: str = TRIGGER) -> Path:
    """`count` pictures (every third one half as wide again, so buckets differ) with .txt captions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    backgrounds = list(BACKGROUNDS)
    for i in range(count):
        shape, background = SHAPES[i % len(SHAPES)], backgrounds[(i // len(SHAPES) + i) % len(backgrounds)]
        img = draw(shape, CONCEPT[1], BACKGROUNDS[background], random_box(rng, size), size)
        if i % 3 == 0:  # a wide one: the same scene on a wider canvas
            from PIL import Image

            wide = Image.new("RGB", (size + size // 2, size), BACKGROUNDS[background])
            wide.paste(img, (size // 4, 0))
            img = wide
        img.save(out / f"{i:03d}.png")
        (out / f"{i:03d}.txt").write_text(concept_caption(shape, background, trigger), encoding="utf-8")
    return out
