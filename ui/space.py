"""Per-visitor workspaces — Space mode (uploads only, one per browser session, caps, ZeroGPU when
present) and lab servers (one per logged-in user).

Space mode is on when the app runs on a Space (the `SPACE_ID` variable) or with `--space`.
Each event handler runs with the visitor's session id in a context variable, so every
`ctx.workspace` a tab touches is that visitor's own folder; see `scope_handlers`.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import os

import gradio as gr

visitor: contextvars.ContextVar[str | None] = contextvars.ContextVar("visitor", default=None)

MAX_STEPS = int(os.environ.get("LORA_LAB_SPACE_MAX_STEPS", 300))
MAX_IMAGES = int(os.environ.get("LORA_LAB_SPACE_MAX_IMAGES", 40))


def detected() -> bool:
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("LORA_LAB_SPACE") == "1"


def _scoped(fn, by: str):
    """`fn` run with the request's session as the current visitor; Gradio passes the request because
    the wrapper's signature asks for it (Gradio reads handler signatures when it calls them)."""
    params = list(inspect.signature(fn).parameters.values())
    extra = inspect.Parameter("_lora_lab_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=gr.Request)

    # The request parameter goes before any *args (a signature allows nothing positional after them).
    cut = next((i for i, p in enumerate(params) if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY, p.VAR_KEYWORD)),
               len(params))

    def session_of(args, kwargs):
        """Take the request out of the call (the handler doesn't expect it) and return its session."""
        req = kwargs.pop("_lora_lab_request", None)
        if req is None and len(args) > cut:
            req = args.pop(cut)
        return getattr(req, by, None) or "anonymous"

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


def scope_handlers(app: gr.Blocks, by: str = "session_hash") -> None:
    """Give every event handler of `app` the visitor scope: the browser session (Space mode) or the
    logged-in user (`by="username"`, a lab server with several users)."""
    for block_fn in app.fns.values():
        if block_fn.fn is not None:
            block_fn.fn = _scoped(block_fn.fn, by)


def gpu(fn, duration: int = 120):
    """On ZeroGPU hardware, ask for the GPU around `fn`; elsewhere `fn` as it is."""
    if not os.environ.get("SPACE_ID"):
        return fn
    try:
        import spaces  # only present on Hugging Face Spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)
