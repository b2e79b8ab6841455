"""Per-visitor workspaces — Space mode (uploads only, one per browser session, caps, ZeroGPU when
present) and lab servers (one per logged-in user).

Space mode is on when the app runs on a Space (the `SPACE_ID` variable) or with `--space`.
Each event handler runs with the caller's identity (the signed visitor cookie of identity.py, or
the logged-in user) in a context variable, so every `ctx.workspace` a tab touches is the caller's own
folder; see `scope_handlers`.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import os
from collections import OrderedDict
from pathlib import Path

import gradio as gr

visitor: contextvars.ContextVar[str | None] = contextvars.ContextVar("visitor", default=None)

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


def detected() -> bool:
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("LORA_LAB_SPACE") == "1"


def check_caps(ctx, cfg) -> None:
    """Space mode: a run's total work stays within the demo's caps, whatever setting multiplies it."""
    from trainer.data.images import IMAGE_EXTS
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
    if cfg.save.every_n_steps and t.steps // cfg.save.every_n_steps > MAX_CHECKPOINTS:
        refuse(f"at most {MAX_CHECKPOINTS} checkpoints in a run", "Raise save.every_n_steps.")
    source = Path(d.source)
    images = [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS] if source.is_dir() else []
    if len(images) > MAX_IMAGES:
        refuse(f"training on at most {MAX_IMAGES} images (the dataset has {len(images)})", "Upload fewer images.")


SESSIONS = 100_000  # page sessions remembered with their owner


def _scoped(fn, who_of):
    """`fn` run with the request's caller as the current visitor; Gradio passes the request because
    the wrapper's signature asks for it (Gradio reads handler signatures when it calls them).

    A page session (Gradio's session hash, chosen by the browser) belongs to the caller who first used
    it: Gradio keeps a page's State values under that hash, so a caller sending another's hash is
    refused before those values reach any handler."""
    params = list(inspect.signature(fn).parameters.values())
    extra = inspect.Parameter("_lora_lab_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=gr.Request)

    # The request parameter goes before any *args (a signature allows nothing positional after them).
    cut = next((i for i, p in enumerate(params) if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY, p.VAR_KEYWORD)),
               len(params))

    def session_of(args, kwargs):
        """Take the request out of the call (the handler doesn't expect it) and return its caller."""
        req = kwargs.pop("_lora_lab_request", None)
        if req is None and len(args) > cut:
            req = args.pop(cut)
        who = who_of(req) if req is not None else None
        if not who:
            raise gr.Error("This page has no visitor cookie, so your files could not be kept apart from others'. "
                           "Allow cookies for this site and reload the page (scripts: send the cookie the page "
                           "sets).")
        page = getattr(req, "session_hash", None)
        if page:
            owner = OWNERS.setdefault(page, who)
            OWNERS.move_to_end(page)
            if len(OWNERS) > SESSIONS:
                OWNERS.popitem(last=False)
            if owner != who:
                raise gr.Error("This page session belongs to someone else. Reload the page.")
        return who

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen(*args, **kwargs):
            args = list(args)
            who = session_of(args, kwargs)
            steps = fn(*args, **kwargs)
            while True:
                visitor.set(who)  # as below: each step may run in a fresh copy of the context
                try:
                    value = await steps.__anext__()
                except StopAsyncIteration:
                    return
                yield value
        wrapper = agen
    elif inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            args = list(args)
            who = session_of(args, kwargs)
            steps = fn(*args, **kwargs)
            while True:
                # Gradio runs each step of a generator in a fresh copy of the context: set it every time.
                visitor.set(who)
                try:
                    value = next(steps)
                except StopIteration:
                    return
                yield value
        wrapper = gen
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            args = list(args)
            token = visitor.set(session_of(args, kwargs))
            try:
                return fn(*args, **kwargs)
            finally:
                visitor.reset(token)
    wrapper.__signature__ = inspect.Signature(params[:cut] + [extra] + params[cut:])
    # Gradio finds the request parameter through the type hints, which functools.wraps copied from fn.
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "_lora_lab_request": gr.Request}
    return wrapper


OWNERS: OrderedDict[str, str] = OrderedDict()


def scope_handlers(app: gr.Blocks, ctx) -> None:
    """Give every event handler of `app` the caller's scope: the signed visitor cookie (Space mode) or
    the logged-in user (a lab server with several users)."""
    if ctx.space:
        def who_of(req):
            return ctx.visitors.of_cookies(getattr(req, "cookies", None) or {})
    else:
        def who_of(req):
            return getattr(req, "username", None)
    for block_fn in app.fns.values():
        if block_fn.fn is not None:
            block_fn.fn = _scoped(block_fn.fn, who_of)


def gpu(fn, duration: int = 120):
    """On ZeroGPU hardware, ask for the GPU around `fn`; elsewhere `fn` as it is."""
    if not os.environ.get("SPACE_ID"):
        return fn
    try:
        import spaces  # only present on Hugging Face Spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)
