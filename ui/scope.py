"""Every event handler runs as its caller, and fails with a message.

Where several people use the app (a lab server, a Space), each handler runs with the caller's
identity (the logged-in user, or the signed visitor cookie of identity.py) in a context variable,
so every `ctx.workspace` a tab touches is the caller's own folder. On every launch an error that a
handler did not turn into a message itself reaches the page as one line (trainer.errors' message
for a user's mistake, the kind of failure otherwise), never as Gradio's bare "Error".
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from collections import OrderedDict

import gradio as gr

from .errors import message

visitor: contextvars.ContextVar[str | None] = contextvars.ContextVar("visitor", default=None)

SESSIONS = 100_000  # page sessions remembered with their owner
OWNERS: OrderedDict[str, str] = OrderedDict()


def _failed(e: Exception) -> gr.Error:
    return gr.Error(message(e).removeprefix("⚠️ "))


def _caller(req, who_of) -> str | None:
    """The caller of a request, or None where the app has one user; refuses a request that can't be
    placed, and one that sends another caller's page session.

    A page session (Gradio's session hash, chosen by the browser) belongs to the caller who first used
    it: Gradio keeps a page's State values under that hash, so a caller sending another's hash is
    refused before those values reach any handler."""
    if who_of is None:
        return None
    who = who_of(req) if req is not None else None
    if not who:
        raise gr.Error("This page has no visitor cookie, so your files could not be kept apart from others'. "
                       "Allow cookies for this site and reload the page (scripts: keep the cookie the page sets).")
    page = getattr(req, "session_hash", None)
    if page:
        owner = OWNERS.setdefault(page, who)
        OWNERS.move_to_end(page)
        if len(OWNERS) > SESSIONS:
            OWNERS.popitem(last=False)
        if owner != who:
            raise gr.Error("This page session belongs to someone else. Reload the page.")
    return who


def _scoped(fn, who_of):
    """`fn` run as the request's caller; Gradio passes the request because the wrapper's signature asks
    for it (Gradio reads handler signatures when it calls them)."""
    params = list(inspect.signature(fn).parameters.values())
    extra = inspect.Parameter("_lora_lab_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=gr.Request)
    # The request parameter goes before any *args (a signature allows nothing positional after them).
    cut = next((i for i, p in enumerate(params) if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY, p.VAR_KEYWORD)),
               len(params))

    def enter(args, kwargs):
        """Take the request out of the call (the handler doesn't expect it) and return its caller."""
        req = kwargs.pop("_lora_lab_request", None)
        if req is None and len(args) > cut:
            req = args.pop(cut)
        return _caller(req, who_of)

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            args = list(args)
            who = enter(args, kwargs)
            steps = fn(*args, **kwargs)
            while True:
                visitor.set(who)  # as below: each step may run in a fresh copy of the context
                try:
                    value = await steps.__anext__()
                except StopAsyncIteration:
                    return
                except gr.Error:
                    raise
                except Exception as e:
                    raise _failed(e) from None
                yield value
    elif inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            args = list(args)
            who = enter(args, kwargs)
            steps = fn(*args, **kwargs)
            while True:
                # Gradio runs each step of a generator in a fresh copy of the context: set it every time.
                visitor.set(who)
                try:
                    value = next(steps)
                except StopIteration:
                    return
                except gr.Error:
                    raise
                except Exception as e:
                    raise _failed(e) from None
                yield value
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            args = list(args)
            token = visitor.set(enter(args, kwargs))
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise _failed(e) from None
            finally:
                visitor.reset(token)
    wrapper.__signature__ = inspect.Signature(params[:cut] + [extra] + params[cut:])
    # Gradio finds the request parameter through the type hints, which functools.wraps copied from fn.
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "_lora_lab_request": gr.Request}
    return wrapper


def scope_handlers(app: gr.Blocks, ctx) -> None:
    """Wrap every event handler of `app`: it runs as its caller (a Space visitor by their signed
    cookie, a lab server's user by their login; nobody in particular on a single-user launch), and
    its failures reach the page as messages."""
    if ctx.space:
        def who_of(req):
            return ctx.visitors.of_cookies(getattr(req, "cookies", None) or {})
    elif ctx.per_user:
        def who_of(req):
            return getattr(req, "username", None)
    else:
        who_of = None
    for block_fn in app.fns.values():
        if block_fn.fn is not None:
            block_fn.fn = _scoped(block_fn.fn, who_of)
