"""Show problems in place: a user error as its message, anything else without a traceback."""
from __future__ import annotations

import errno
import functools
import logging

from trainer.errors import LoraLabError, shown

log = logging.getLogger("lora-lab")


WRITE_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
                errno.EDQUOT: "the disk quota is used up"}


def message(e: Exception) -> str:
    if isinstance(e, LoraLabError):
        return f"⚠️ {e.problem} {e.fix}".strip()
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        where = f" ({shown(e.filename)})" if e.filename else ""
        return (f"⚠️ LoRA Lab could not write to the workspace{where}: {WRITE_ERRORS[e.errno]}. Ask whoever runs "
                "the server to make the workspace folder writable (or free space); nothing else was changed.")
    log.exception("unexpected error in the app")
    return f"⚠️ Something went wrong: {type(e).__name__}: {shown(str(e), 300)}. The app's console has details."


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
