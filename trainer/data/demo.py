"""A small captioned image folder made in code, for demos and tests (no download)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}


def make_demo_dataset(out_dir: Path, count: int = 8, size: int = 96, trigger: str = "lablora") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colors = list(COLORS)
    for i in range(count):
        shape, color = SHAPES[i % len(SHAPES)], colors[i % len(colors)]
        w = size if i % 3 else size + size // 2  # a few wide images, so buckets differ
        img = Image.new("RGB", (w, size), tuple(int(v) for v in rng.integers(200, 255, 3)))
        d = ImageDraw.Draw(img)
        cx, cy, r = w // 2, size // 2, size // 3
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
        elif shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        img.save(out / f"{i:03d}.png")
        (out / f"{i:03d}.txt").write_text(f"{trigger}, a {color} {shape}, plain background", encoding="utf-8")
    return out
