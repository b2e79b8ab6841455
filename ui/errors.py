"""Show problems in place: a user error as its message, anything else without a traceback."""
from __future__ import annotations

import functools
import logging

from trainer.errors import LoraLabError

log = logging.getLogger("lora-lab")


def message(e: Exception) -> str:
    if isinstance(e, LoraLabError):
        return f"⚠️ {e.problem} {e.fix}".strip()
    log.exception("unexpected error in the app")
    return f"⚠️ Something went wrong: {type(e).__name__}: {e}. The app's console has details."


def guarded(n_outputs: int, message_index: int = 0):
    """Wrap a handler so an exception becomes a message in output `message_index`; others unchanged."""
    import gradio as gr

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args):
            try:
                return fn(*args)
            except Exception as e:  # every error ends as a message in the page, never a traceback
                outs = [gr.skip()] * n_outputs
                outs[message_index] = message(e)
                return tuple(outs) if n_outputs > 1 else outs[0]
        return inner
    return wrap
