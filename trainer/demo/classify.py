"""A pixel classifier for the demo model's pictures (no pretrained network exists offline).

How it decides, for a picture of a flat shape on a flat background:
- **background**: the median colour of the outer 3-pixel ring, named by the nearest background colour;
- **foreground**: the pixels more than 60 (RGB distance) away from that colour; under 1.5 % of the
  picture means no shape was drawn;
- **shape colour**: the median colour of the foreground, named by the nearest shape colour (the
  concept colour included when asked);
- **shape**: each candidate shape is drawn into the bounding box of the foreground (1st–99th
  percentile of its coordinates, so stray pixels do not stretch it); the one overlapping the
  foreground best (intersection over union) is the shape.
"""
from __future__ import annotations

import numpy as np

from .shapes import BACKGROUNDS, COLORS, CONCEPT, SHAPES, shape_mask

FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND = 0.015


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    d = [np.linalg.norm(rgb - np.asarray(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(d))]


def classify(image, with_concept: bool = False) -> dict:
    """{"background", "color", "shape", "rgb" (the shape's median colour)} of one picture (a PIL image or an
    HxWx3 array); None where absent."""
    px = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.float32)
    h, w, _ = px.shape
    ring = np.concatenate([px[:3].reshape(-1, 3), px[-3:].reshape(-1, 3),
                           px[:, :3].reshape(-1, 3), px[:, -3:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    fg = np.linalg.norm(px - bg, axis=-1) > FOREGROUND_DISTANCE
    out = {"background": _nearest(bg, BACKGROUNDS), "color": None, "shape": None, "rgb": None,
           "foreground": float(fg.mean())}
    if fg.mean() < MIN_FOREGROUND:
        return out
    palette = {**COLORS, CONCEPT[0]: CONCEPT[1]} if with_concept else COLORS
    out["rgb"] = np.median(px[fg], axis=0)
    out["color"] = _nearest(out["rgb"], palette)
    ys, xs = np.nonzero(fg)
    box = (np.percentile(xs, 1), np.percentile(ys, 1), np.percentile(xs, 99) + 1, np.percentile(ys, 99) + 1)
    best, best_iou = None, -1.0
    for shape in SHAPES:
        ideal = shape_mask(shape, box, (w, h)) > 0.5
        iou = (ideal & fg).sum() / max(1, (ideal | fg).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    out["shape"] = best
    return out


def score(results: list[tuple[dict, tuple[str, str, str]]]) -> dict:
    """Shares right over (classified, (shape, colour, background) asked) pairs."""
    n = max(1, len(results))
    return {"background": sum(r["background"] == want[2] for r, want in results) / n,
            "color": sum(r["color"] == want[1] for r, want in results) / n,
            "shape": sum(r["shape"] == want[0] for r, want in results) / n}
