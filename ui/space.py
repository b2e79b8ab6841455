"""Per-visitor workspaces — Space mode (uploads only, one per browser session, caps, ZeroGPU when
present) and lab servers (one per logged-in user).

Space mode is on when the app runs on a Space (the `SPACE_ID` variable) or with `--space`. Who
the caller is comes from scope.py (each handler runs as its caller); this module holds the caps.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from trainer.plan_summary import family_guess, file_mb
from trainer.validation import every

def _env(name: str, default: int) -> int:
    return int(os.environ.get(f"LORA_LAB_SPACE_{name}", default))


MAX_STEPS = _env("MAX_STEPS", 300)
MAX_IMAGES = _env("MAX_IMAGES", 40)
MAX_BATCH = _env("MAX_BATCH", 4)            # images per optimizer step (batch × gradient accumulation)
MAX_RESOLUTION = _env("MAX_RESOLUTION", 1024)  # training, bucket and sample sides
MAX_SAMPLE_IMAGES = _env("MAX_SAMPLE_IMAGES", 40)  # sample images over a whole run
MAX_CHECKPOINTS = _env("MAX_CHECKPOINTS", 10)
MAX_GEN_PROMPTS = _env("MAX_GEN_PROMPTS", 8)  # Test tab: prompts per click
MAX_GEN_SIDE = _env("MAX_GEN_SIDE", 1024)
MAX_UPLOAD = _env("MAX_UPLOAD_MB", 200) * 1024**2  # one uploaded file (Gradio refuses larger ones)
MAX_RANK = _env("MAX_RANK", 64)
MAX_QUEUE = _env("MAX_QUEUE", 8)  # runs waiting, all visitors together
MAX_VALIDATION = _env("MAX_VALIDATION", 2000)  # validation passes in a run: images × timesteps × measurements
MAX_LORA_MB = _env("MAX_LORA_MB", 256)  # one adapter file (a run keeps up to 6: checkpoints, final, EMA, best)


def detected() -> bool:
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("LORA_LAB_SPACE") == "1"


def check_caps(ctx, cfg) -> None:
    """Space mode: a run's total work stays within the demo's caps, whatever setting multiplies it."""
    from trainer.errors import LoraLabError

    def refuse(what: str, fix: str):
        raise LoraLabError(f"This demo allows {what}.", fix)

    t, d, s = cfg.train, cfg.dataset, cfg.sample
    if t.steps > MAX_STEPS:
        refuse(f"at most {MAX_STEPS} steps (asked: {t.steps})", f"Set steps to {MAX_STEPS} or fewer.")
    if t.batch_size * t.gradient_accumulation > MAX_BATCH:
        refuse(f"at most {MAX_BATCH} images per step (batch size × gradient accumulation; asked: "
               f"{t.batch_size * t.gradient_accumulation})", "Lower train.batch_size or train.gradient_accumulation.")
    sides = {"dataset.resolution": d.resolution, "dataset.bucket_max_side": d.bucket_max_side,
             "sample.width": s.width, "sample.height": s.height}
    for key, side in sides.items():
        if side > MAX_RESOLUTION:
            refuse(f"sides of at most {MAX_RESOLUTION} px ({key} is {side})", f"Set {key} to {MAX_RESOLUTION} or less.")
    if d.repeats > 100:
        refuse(f"at most 100 repeats (asked: {d.repeats})", "Lower dataset.repeats.")
    rounds = (t.steps // s.every_n_steps if s.every_n_steps else 0) + 1
    if len(s.prompts) * rounds > MAX_SAMPLE_IMAGES or s.steps > 50:
        refuse(f"at most {MAX_SAMPLE_IMAGES} sample images of at most 50 steps in a run (asked: "
               f"{len(s.prompts)} prompts × {rounds} times, {s.steps} steps)",
               "Use fewer sample prompts, sample less often, or fewer sample steps.")
    if cfg.network.rank > MAX_RANK:
        refuse(f"ranks of at most {MAX_RANK} (asked: {cfg.network.rank})", f"Set network.rank to {MAX_RANK} or less.")
    if cfg.save.keep_last > 3:
        refuse("at most 3 checkpoints kept", "Set save.keep_last to 3 or less.")
    if cfg.save.every_n_steps and t.steps // cfg.save.every_n_steps > MAX_CHECKPOINTS:
        refuse(f"at most {MAX_CHECKPOINTS} checkpoints in a run", "Raise save.every_n_steps.")
    size = file_mb(cfg, family_guess(cfg.model.base))
    if size and size > MAX_LORA_MB:
        refuse(f"adapter files of at most {MAX_LORA_MB} MB (this one: about {size:,.0f} MB)",
               "Lower network.rank, train fewer layers (network.targets), or use LoRA instead of OFT.")
    images = _images(d.source)
    folders = _repeat_folders(d.source)  # kohya `N_name` folders: N repeats, whatever dataset.repeats says
    if folders and max(folders.values()) > 100:
        name = max(folders, key=folders.get)
        refuse(f"at most 100 repeats (the folder {name[:40]} asks for {folders[name]:,})", "Rename it to 100_… or less.")
    if images > MAX_IMAGES:
        refuse(f"training on at most {MAX_IMAGES} images (the dataset has {images})", "Upload fewer images.")
    v = cfg.validation
    if v.enabled:
        measured = _images(v.source) if v.source else images
        if measured > MAX_IMAGES:
            refuse(f"validation on at most {MAX_IMAGES} images (validation.source has {measured})",
                   "Use a smaller validation folder, or leave validation.source empty.")
        interval = every(v, cfg.save.every_n_steps, t.steps)
        times = t.steps // interval + 1 + (t.steps % interval != 0)  # step 0, each interval, and the last step
        if measured * v.timesteps * times > MAX_VALIDATION:
            refuse(f"at most {MAX_VALIDATION:,} validation passes in a run (images × timesteps × measurements; "
                   f"asked: {measured} × {v.timesteps} × {times})",
                   "Raise validation.every_n_steps, lower validation.timesteps, or turn validation off.")


def _repeat_folders(source: str) -> dict[str, int]:
    from trainer.data.sources import KOHYA_DIR

    folder = Path(source)
    if not folder.is_dir():
        return {}
    return {d.name: int(m.group(1)) for d in folder.iterdir() if d.is_dir() and (m := KOHYA_DIR.match(d.name))}


def _images(source: str) -> int:
    from trainer.data.images import IMAGE_EXTS

    folder = Path(source)
    return sum(p.suffix.lower() in IMAGE_EXTS for p in folder.rglob("*")) if folder.is_dir() else 0


_ON_DEMAND: dict[tuple[str, str], int] = {}  # (run folder, "sample" | "save") → requests taken, while the app runs
_ON_DEMAND_LOCK = threading.Lock()


def on_demand(run, kind: str) -> str | None:
    """Space mode: take one *Sample now* or *Save now* for `run` from what its caps leave beyond the run's own
    plan; None if taken, else why not (each request is one more round of samples or one more checkpoint)."""
    from trainer.config import load

    cfg = load(run.config_path)
    t, s = cfg.train, cfg.sample
    if kind == "sample":
        cost = len(s.prompts)
        if not cost:
            return None  # makes nothing
        planned = cost * ((t.steps // s.every_n_steps if s.every_n_steps else 0) + 1)
        most = (MAX_SAMPLE_IMAGES - planned) // cost
        limit = f"at most {MAX_SAMPLE_IMAGES} sample images in a run ({planned} planned by its settings)"
    else:
        every_n = cfg.save.every_n_steps
        planned = (t.steps // every_n if every_n else 0) + 1
        most = MAX_CHECKPOINTS - planned
        limit = f"at most {MAX_CHECKPOINTS} checkpoints in a run ({planned} planned by its settings)"
    key = (str(run.path.resolve()), kind)
    with _ON_DEMAND_LOCK:
        used = _ON_DEMAND.get(key, 0)
        if used >= most:
            return (f"This demo allows {limit}: *{'Sample' if kind == 'sample' else 'Save'} now* is used up for "
                    f"**{run.name}** ({used} taken). The ones its settings plan still come.")
        _ON_DEMAND[key] = used + 1
    return None


def gpu(fn, duration: int = 120):
    """On ZeroGPU hardware, ask for the GPU around `fn`; elsewhere `fn` as it is."""
    if not os.environ.get("SPACE_ID"):
        return fn
    try:
        import spaces  # only present on Hugging Face Spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)
