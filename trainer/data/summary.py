"""What a user wants to know of a dataset before training on it, and caption editing."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from ..errors import LoraLabError
from .buckets import effective_bucket_params, make_buckets, pick_bucket
from .sources import Dataset, Problem

TINY_SIDE = 64


def summarize(ds: Dataset, resolution: int = 512, multiple: int = 64, min_side=256, max_side=1024, step=64) -> dict:
    """Counts, size and bucket tables, and problems (adding tiny images and exact duplicates)."""
    items = ds.items
    problems = list(ds.problems)
    digests: dict[str, str] = {}
    for it in items:
        if min(it.size) < TINY_SIDE:
            problems.append(Problem(it.name, f"tiny image ({it.size[0]}x{it.size[1]}); it will look blurry"))
        d = _digest(it.image_path) if it.image_path is not None else None
        if d in digests:
            problems.append(Problem(it.name, f"duplicate of {digests[d]}"))
        if d:
            digests.setdefault(d, it.name)
    lo, hi, st = effective_bucket_params(resolution, min_side, max_side, step, multiple)
    buckets = make_buckets(resolution, lo, hi, st)
    by_bucket = Counter(pick_bucket(it.size, buckets, resolution, st) for it in items)
    sizes = Counter(it.size for it in items)
    captioned = sum(1 for it in items if it.caption.strip())
    return {
        "layout": ds.layout,
        "images": len(items),
        "captioned": captioned,
        "missing_captions": len(items) - captioned,
        "repeats": ds.total_repeats,
        "sizes": [[f"{w}x{h}", n] for (w, h), n in sizes.most_common()],
        "buckets": [[f"{w}x{h}", n] for (w, h), n in sorted(by_bucket.items())],
        "problems": [[p.name, p.problem] for p in problems],
    }


def _digest(path: Path) -> str | None:
    """The file's hash, read in pieces (never the image decoded); None for a file too big to compare or gone."""
    try:
        if path.stat().st_size >= 50_000_000:
            return None
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    except OSError:  # deleted or unreadable since the folder was scanned: nothing to compare
        return None


def caption_file(item, captions_dir: Path | None = None) -> Path:
    """Where an item's caption is saved: its sidecar, or (hub datasets) a file in the workspace."""
    if item.caption_path is not None:
        return item.caption_path
    if captions_dir is None:
        raise LoraLabError(f"{item.name} has no caption file to write.", "Save the dataset to a folder first.")
    return captions_dir / f"{item.name.replace(' ', '_')}.txt"


MAX_CAPTION = 4000  # characters: a long tag list is a few hundred; CLIP reads 77 tokens (225 with chunking)


def check_caption(text: str) -> str:
    text = " ".join((text or "").split())
    if len(text) > MAX_CAPTION:
        raise LoraLabError(f"A caption of {len(text):,} characters is too long.",
                           f"Keep captions under {MAX_CAPTION:,} characters (the text encoder reads far fewer).")
    return text


def save_caption(item, text: str, captions_dir: Path | None = None) -> Path:
    text = check_caption(text)
    path = caption_file(item, captions_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = " ".join(text.split())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    item.caption = text
    return path


def bulk_edit(caption: str, prefix: str = "", suffix: str = "", find: str = "", replace: str = "",
              remove_tags: str = "") -> str:
    """One caption after the bulk operations: remove tags, find/replace, then prefix and suffix."""
    tags = [t.strip() for t in caption.split(",")] if caption else []
    drop = {t.strip().lower() for t in remove_tags.split(",") if t.strip()}
    if drop:
        tags = [t for t in tags if t.lower() not in drop]
    out = ", ".join(t for t in tags if t)
    if find:
        out = out.replace(find, replace)
    prefix, suffix = prefix.strip(" ,"), suffix.strip(" ,")  # "lablora, " is typed often: one comma between
    if prefix and not out.startswith(prefix):
        out = f"{prefix}, {out}" if out else prefix
    if suffix and not out.endswith(suffix):
        out = f"{out}, {suffix}" if out else suffix
    return out
