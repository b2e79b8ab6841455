"""Flat shapes on flat backgrounds, drawn in code, with captions from a small grammar.

"a red circle on a white background": the demo model learns these, and a LoRA on the demo
dataset teaches it a colour it has never seen (`CONCEPT`).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
          "green": (40, 170, 60), "blue": (40, 90, 230), "purple": (140, 60, 200)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
               "brown": (120, 80, 40)}
# Never in the demo model's training: the demo dataset teaches it under a trigger word.
CONCEPT = ("pink", (255, 105, 180))
WORDS = ("a", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS)


def shape_mask(shape: str, box: tuple[float, float, float, float], size: tuple[int, int], scale: int = 4) -> np.ndarray:
    """A boolean mask of `shape` filling `box` (x0, y0, x1, y1) in an image of `size` (w, h), antialiased."""
    w, h = size
    img = Image.new("L", (w * scale, h * scale), 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * scale for v in box)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    elif shape == "cross":
        tx, ty = (x1 - x0) / 3, (y1 - y0) / 3
        d.rectangle((x0 + tx, y0, x1 - tx, y1), fill=255)
        d.rectangle((x0, y0 + ty, x1, y1 - ty), fill=255)
    else:
        raise ValueError(f"unknown shape {shape}")
    return np.asarray(img.resize((w, h), Image.BILINEAR)) / 255.0


def draw(shape: str, color: tuple, background: tuple, box, size: int = 64) -> Image.Image:
    """One picture: `shape` in `color` filling `box` on `background`."""
    a = shape_mask(shape, box, (size, size))[..., None]
    px = np.asarray(background, np.float32) * (1 - a) + np.asarray(color, np.float32) * a
    return Image.fromarray(px.round().astype(np.uint8))


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def varied_caption(shape: str, color: str, background: str, rng: np.random.Generator) -> str:
    """A training caption: usually the grammar's, sometimes with the colour left out (then any colour is
    right) or with a tag of random letters in front or behind, as a user's trigger word or style tag
    would be. So the model reads the words, not their positions, and a caption such as "lablora, a
    circle on a white background" means a circle on white in some colour, not noise."""
    words = caption(shape, color, background)
    if rng.random() < 0.15:
        words = f"a {shape} on a {background} background"
    tag = lambda: "".join(chr(97 + int(i)) for i in rng.integers(26, size=int(rng.integers(3, 9))))  # noqa: E731
    r = rng.random()
    if r < 0.3:
        words = f"{tag()}, {words}"
    elif r < 0.4:
        words = f"{words}, {tag()}"
    return words


def random_box(rng: np.random.Generator, size: int = 64) -> tuple[float, float, float, float]:
    """A square box 30–60 % of the picture wide, anywhere it fits."""
    side = rng.uniform(0.3, 0.6) * size
    x0, y0 = rng.uniform(2, size - side - 2, 2)
    return (x0, y0, x0 + side, y0 + side)


def random_scene(rng: np.random.Generator, size: int = 64, colors: dict | None = None):
    """(image, caption, (shape, colour, background)) with a shape colour unlike the background's."""
    colors = colors or COLORS
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(colors)[rng.integers(len(colors))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    img = draw(shape, colors[color], BACKGROUNDS[background], random_box(rng, size), size)
    return img, caption(shape, color, background), (shape, color, background)
