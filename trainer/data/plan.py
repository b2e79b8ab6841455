"""Which size each image trains at, the order batches come in, and each step's caption."""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import LoraLabError
from .buckets import effective_bucket_params, make_buckets, pick_bucket
from .sources import Dataset


@dataclass
class Example:
    index: int                 # into dataset.items
    size: tuple[int, int]      # training size in pixels (w, h)
    caption: str               # with the prefix, before shuffling and dropout
    repeats: int


def with_prefix(caption: str, prefix: str) -> str:
    prefix = prefix.strip()
    if not prefix or caption.startswith(prefix):
        return caption or prefix
    return f"{prefix}, {caption}" if caption else prefix


def plan_examples(ds: Dataset, dcfg, multiple: int) -> list[Example]:
    """Every item's training size: its bucket, or the fixed size of the resize mode."""
    res = dcfg.resolution
    if res % multiple:
        raise LoraLabError(f"dataset.resolution {res} cannot be used with this model.",
                           f"Use a multiple of {multiple} (e.g. {max(multiple, res // multiple * multiple)}).")
    out = []
    if dcfg.bucketing:
        lo, hi, step = effective_bucket_params(res, dcfg.bucket_min_side, dcfg.bucket_max_side, dcfg.bucket_step,
                                               multiple)
        buckets = make_buckets(res, lo, hi, step)
    for i, item in enumerate(ds.items):
        if dcfg.bucketing:
            size = pick_bucket(item.size, buckets, res, step)
        elif dcfg.resize == "none":
            size = (max(multiple, item.size[0] // multiple * multiple), max(multiple, item.size[1] // multiple * multiple))
        else:
            size = (res, res)
        out.append(Example(i, size, with_prefix(item.caption, dcfg.caption_prefix), item.repeats))
    return out


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices for one epoch; every batch holds one size (one bucket)."""
    rng = random.Random(seed * 100_003 + epoch)
    by_size: dict[tuple[int, int], list[int]] = {}
    for n, ex in enumerate(examples):
        by_size.setdefault(ex.size, []).extend([n] * ex.repeats)
    batches = []
    for size in sorted(by_size):
        idx = by_size[size]
        rng.shuffle(idx)
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def step_caption(caption: str, dcfg, rng: random.Random) -> str:
    if dcfg.caption_dropout and rng.random() < dcfg.caption_dropout:
        return ""
    if dcfg.shuffle_tags:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        keep = dcfg.keep_tokens + (1 if dcfg.caption_prefix.strip() and tags and tags[0] == dcfg.caption_prefix.strip() else 0)
        head, tail = tags[:keep], tags[keep:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption
