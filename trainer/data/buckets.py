"""Aspect-ratio buckets, as kohya_ss makes them, and the size each image trains at."""
from __future__ import annotations

import math


def _floor(v: float, step: int) -> int:
    return max(step, int(v // step) * step)


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """All (w, h) with sides in [min_side, max_side], multiples of step, area ≤ resolution²."""
    area = resolution * resolution
    out = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, _floor(area / w, step))
        if h >= min_side and w * h <= area:
            out.add((w, h))
            out.add((h, w))
    out.add((_floor(resolution, step),) * 2)
    return sorted(out)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], resolution: int, step: int) -> tuple[int, int]:
    """The bucket for an image of `size`: the closest aspect ratio; never larger than the image."""
    w, h = size
    if w * h < resolution * resolution and (w < resolution or h < resolution):
        # No upscaling: a small image trains at its own size, rounded down to the step.
        return _floor(w, step), _floor(h, step)
    ar = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def effective_bucket_params(resolution: int, min_side: int, max_side: int, step: int, multiple: int):
    """Bucket settings that fit the resolution and what the model can take (sides divisible by `multiple`)."""
    step = max(multiple, (min(step, max(multiple, resolution // 4)) // multiple) * multiple)
    min_side = max(step, (min(min_side, resolution) // step) * step)
    max_side = max(max_side, resolution)
    return min_side, max_side, step
