"""Who may touch what: the one check for every run, LoRA, model, dataset, file or config path that a
request names.

The caller's own workspace (`ctx.workspace`) may be read and written. The shared folders (the model
folders and `--data-dir`) may be read, never written. In Space mode there is nothing but the
visitor's own workspace. On a local single-user launch (127.0.0.1, no `--share`, one user) the user
is the machine's owner: any folder they type is theirs to read and write.

Names the UI offers (runs, LoRAs) are looked up among the caller's own, never joined onto a path,
so a free-text dropdown or a scripted request can't turn them into one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.errors import LoraLabError, shown
from trainer.models.tiny import TINY_IDS as TINY
from trainer.runs import RunDir, list_runs

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LISTED_TINY = ("tiny-demo", "tiny-demo-xl")  # offered in the lists; the random ones are for tests


def shared(ctx) -> bool:
    """People who do not trust each other use this app (a lab server, a Space, a public link)."""
    return ctx.space or ctx.per_user or not ctx.local


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def readable_roots(ctx) -> list[Path]:
    """Where a shared launch's callers may read (a local launch's user may read anywhere)."""
    if ctx.space:
        return [ctx.workspace.resolve()]
    return [ctx.workspace.resolve(), *ctx.model_dirs, *ctx.data_dirs]


def read_path(ctx, text: str, must_exist: bool = True) -> Path:
    """A path typed by the user, resolved (relative to their workspace) and confined to what they may read."""
    text = (text or "").strip().strip('"') if isinstance(text, str) else ""
    if not text:
        raise LoraLabError("No path given.", "Type or paste a folder path.")
    try:
        p = Path(text).expanduser()
        p = (p if p.is_absolute() else ctx.workspace / p).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a loop of links, an unknown ~user
        raise LoraLabError(f"'{shown(text)}' is not a usable path.", "Type the folder's path as the file manager shows it.")
    # resolve() has followed every link and '..', so this also stops escapes through links.
    others = (ctx.space or ctx.per_user) and _inside(p, ctx.root) and not _inside(p, ctx.workspace.resolve())
    if shared(ctx) and (others or not any(_inside(p, root) for root in readable_roots(ctx))):
        if ctx.space:
            raise LoraLabError("This is a shared demo: folders on the server are not available.",
                               "Upload your images (or a zip) in the Dataset tab instead.")
        allowed = ", ".join(map(str, readable_roots(ctx)))
        raise LoraLabError(f"{shown(text)} is outside the folders LoRA Lab may use.",
                           f"This app is shared: put it in your workspace (allowed now: {allowed}), or ask whoever "
                           "runs it to add its folder with --data-dir.")
    if must_exist and not p.exists():
        raise LoraLabError(f"{shown(text)} does not exist.", "Check the path (it is on the machine running LoRA Lab).")
    return p


def write_path(ctx, path: Path) -> Path:
    """`path` if the caller may change it: inside their workspace (or, on a local single-user launch,
    anywhere they may read); otherwise a message that the folder is read-only here."""
    p = Path(path).resolve()
    if _inside(p, ctx.workspace.resolve()):
        return p
    if not shared(ctx):
        return p
    raise LoraLabError(f"{p.parent} is a shared folder: LoRA Lab only reads it.",
                       "Copy it into your workspace (Dataset tab: *Copy into my workspace*) and edit the copy.")


def run(ctx, name) -> RunDir:
    """One of the caller's own runs, by its name as the run history shows it."""
    if not isinstance(name, str) or not name.strip():
        raise LoraLabError("No run picked.", "Pick a run in the run history.")
    for r in list_runs(ctx.workspace):
        if r.name == name.strip():
            return r
    raise LoraLabError(f"There is no run '{shown(name)}' of yours.", "Pick one from the run history.")


FAMILY_NAMES = {"sd15": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def _label(path: Path, run: str | None = None) -> str:
    """`name.safetensors (SD 1.x, step 400)`, from the file's header only (its tensors are not read)."""
    from safetensors import safe_open

    from trainer.lora_file import FAMILY_OF_VERSION
    from trainer.lora_formats import layout

    try:
        with safe_open(str(path), "np") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception:  # not readable as safetensors: listed by name, refused with a reason when used
        meta, keys = {}, []
    kind = layout(keys) if keys else ""
    facts = [FAMILY_NAMES.get(FAMILY_OF_VERSION.get(meta.get("ss_base_model_version", ""), ""), "")]
    facts += [f"{kind} file"] if kind in ("diffusers", "peft", "ComfyUI") else []
    facts += [f"step {meta['ss_steps']}"] if meta.get("ss_steps") else []
    facts += [f"run {run}"] if run and run != path.stem else []
    facts = [f for f in facts if f]
    return f"{path.name} ({', '.join(facts)})" if facts else path.name


def _my_lora_files(ctx) -> list[tuple[Path, str | None]]:
    """(file, run name or None) of the caller's LoRAs, newest run first, then the uploaded ones."""
    out = []
    for r in list_runs(ctx.workspace):
        st = r.status()
        for key in ("lora", "best_lora", "ema_lora"):  # the final file, the lowest validation loss's, the average
            lora = st.get(key)
            if isinstance(lora, str) and (r.path / Path(lora).name).is_file():
                out.append((r.path / Path(lora).name, r.name))
    return out + [(p, None) for p in sorted((ctx.workspace / "loras").glob("*.safetensors"))]


def _value(path: Path, run: str | None) -> str:
    return f"runs/{run}/{path.name}" if run else f"loras/{path.name}"


def my_loras(ctx) -> list[tuple[str, str]]:
    """(label, value) of the caller's LoRA files; a value is the file's place in the workspace
    (`runs/NAME/NAME.safetensors`, `loras/FILE`), never an absolute path."""
    return [(_label(path, run), _value(path, run)) for path, run in _my_lora_files(ctx)]


def lora(ctx, value) -> Path:
    """A LoRA file the caller may use: one of theirs, or on a launch that is not shared, a typed file path."""
    if not isinstance(value, str) or not value.strip():
        raise LoraLabError("No LoRA picked.", "Pick a LoRA from the list.")
    value = value.strip()
    if value in {_value(path, run) for path, run in _my_lora_files(ctx)}:
        return (ctx.workspace / value).resolve()
    if not shared(ctx):
        p = read_path(ctx, value)
        if p.is_file() and p.suffix.lower() == ".safetensors":
            return p
        raise LoraLabError(f"{shown(value)} is not a .safetensors LoRA file.", "Pick a LoRA from the list.")
    raise LoraLabError(f"'{shown(value)}' is not one of your LoRAs.",
                       "Pick one from the list (your runs and uploads), or upload the file.")


def base_models(ctx) -> list[str]:
    """Models a user can pick: the tiny built-in ones, and files and diffusers folders in the model folders."""
    found = list(LISTED_TINY)
    if ctx.space:
        return found + [m.strip() for m in os.environ.get("LORA_LAB_SPACE_MODELS", "").split(",") if m.strip()]
    for d in ctx.model_dirs:
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES or (p / "model_index.json").exists():
                    found.append(str(p))
    return found


def _looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and ".." not in text


def base_model(ctx, spec) -> str:
    """A base model the caller may load: a demo or listed model; a model file or folder they may read;
    or (not on a Space) a hub id. Returned as the trainer should be given it (paths made absolute)."""
    spec = spec.strip() if isinstance(spec, str) else ""
    if not spec:
        raise LoraLabError("No base model given.", "Pick a base model from the list.")
    if spec in TINY or (ctx.space and spec in base_models(ctx)):
        return spec
    if ctx.space:
        raise LoraLabError(f"The demo offers only these models: {', '.join(base_models(ctx))}.",
                           "Pick one of them, or install LoRA Lab on your own machine for any model.")
    if _looks_like_hub_id(spec) and not (ctx.workspace / spec).exists() and not Path(spec).exists():
        return spec  # downloaded by the trainer from the hub
    p = read_path(ctx, spec)
    if not (p.is_dir() and (p / "model_index.json").is_file() or p.is_file() and p.suffix.lower() in MODEL_SUFFIXES):
        raise LoraLabError(f"{shown(spec)} is not a model.",
                           "Give a diffusers folder (with model_index.json) or a .safetensors checkpoint.")
    return str(p)


def dataset_source(ctx, text) -> str:
    """A hub dataset id as it is (not on a Space); anything else a checked local path, made absolute.

    A name like `docs/screenshots` is a hub id only where no such folder exists: the trainer would
    otherwise open that folder relative to wherever the app runs.
    """
    t = text.strip() if isinstance(text, str) else ""
    if (not ctx.space and _looks_like_hub_id(t) and not (ctx.workspace / t).exists()
            and not os.path.lexists(t)):
        return t
    return str(read_path(ctx, t))


def clip_model(ctx, text) -> str:
    """A CLIP model for scores: a hub id as it is (not on a Space), else a folder the caller may read."""
    spec = dataset_source(ctx, text)
    if Path(spec).is_absolute() and not Path(spec).is_dir():
        raise LoraLabError(f"{shown(text)} is not a folder with a CLIP model.",
                           "Give the folder that holds its config.json and weights, or leave it empty.")
    return spec


def check_config(ctx, cfg) -> None:
    """Confine every path a config names to what the caller may read (rewriting them as absolute
    paths for the trainer), and in Space mode keep the run within the demo's caps."""
    cfg.dataset.source = dataset_source(ctx, cfg.dataset.source)
    if cfg.validation.source:
        cfg.validation.source = dataset_source(ctx, cfg.validation.source)
    if cfg.sample.score_model:
        cfg.sample.score_model = clip_model(ctx, cfg.sample.score_model)
    cfg.model.base = base_model(ctx, cfg.model.base)
    if cfg.model.config_dir:
        p = read_path(ctx, cfg.model.config_dir)
        if not p.is_dir():
            raise LoraLabError(f"model.config_dir {shown(cfg.model.config_dir)} is not a folder.",
                               "Give a diffusers config folder, or leave it empty.")
        cfg.model.config_dir = str(p)
    if cfg.network.init_from:
        cfg.network.init_from = str(lora(ctx, cfg.network.init_from))
    cfg.model.allow_pickle = ctx.allow_pickle
    if ctx.space:
        from .space import check_caps

        check_caps(ctx, cfg)


def may_queue(ctx) -> None:
    """One caller's share of the device queue on a shared app: a Space visitor one run at a time (training
    or waiting), a lab server's user three; a local launch queues as many as its user likes."""
    most = 1 if ctx.space else 3 if shared(ctx) else None
    if ctx.space:
        from .space import MAX_QUEUE

        disk_room(ctx)
        if ctx.jobs.queue_length() >= MAX_QUEUE:
            raise LoraLabError(f"The demo is busy: {ctx.jobs.queue_length()} runs are waiting for the device.",
                               "Try again in a few minutes.")
    # (a run that has said it ended no longer counts while its process is still closing)
    mine = sum(s.run.status().get("state") in ("running", "queued") for s in ctx.jobs.runs_in(ctx.workspace))
    if most is not None and mine >= most:
        raise LoraLabError(f"You have {mine} run{'s' if mine > 1 else ''} training or waiting already; this "
                           f"{'demo' if ctx.space else 'server'} takes {most} at a time from each person.",
                           "Wait for one to end, or cancel a waiting one in the run history.")


def disk_room(ctx) -> None:
    """A Space writes nothing more (uploads, runs, exports) once its disk is nearly full: anyone can be a
    new visitor, so per-visitor totals alone can't protect it."""
    import shutil

    least = float(os.environ.get("LORA_LAB_SPACE_MIN_FREE_MB", 2048)) * 1024**2
    if ctx.space and shutil.disk_usage(ctx.root).free < least:
        raise LoraLabError("The demo's disk is nearly full.", "Try again later, or run LoRA Lab on your own machine.")


def generation(ctx, prompts: list[str], steps, width, height) -> None:
    """Bounds on one Test-tab request: what a shared server will draw for one click."""
    from .space import MAX_GEN_PROMPTS, MAX_GEN_SIDE

    most_prompts, most_side = (MAX_GEN_PROMPTS, MAX_GEN_SIDE) if ctx.space else (64, 4096)
    if not prompts:
        raise LoraLabError("No prompt given.", "Write at least one prompt (one per line).")
    if len(prompts) > most_prompts:
        raise LoraLabError(f"{len(prompts)} prompts at once is too many here.", f"Give at most {most_prompts}.")
    for what, v, hi in (("Steps", steps, 100), ("Width", width, most_side), ("Height", height, most_side)):
        if not isinstance(v, (int, float)) or not 0 <= v <= hi:
            raise LoraLabError(f"{what} {shown(v)} is out of range.", f"Use 0 to {hi}.")
