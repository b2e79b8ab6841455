"""ASGI middleware in front of Gradio for the shared modes (a lab server, a Space).

- Requests another site's page makes with the user's cookies are refused (Gradio's CORS answers any
  origin, with credentials, once the app is reached by a host name).
- Gradio's file routes (`/gradio_api/file=PATH`, `/gradio_api/file/PATH`) serve the workspace folder to
  anyone logged in; here a path inside the workspace is served only from the caller's own workspace.
- Gradio's routes that take a page session id (results, heartbeat, cancel) answer only the caller who
  opened that page (scope.py); its deep links, which hand out a page's whole state, are closed.
- Space visitors get their signed visitor cookie (see identity.py) on their first request, and Gradio's
  upload route wants one.
- Wrong passwords are throttled per user name and address (Gradio's login has no limit).
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict, deque
from pathlib import Path

from .identity import Visitors

FAILS_PER_USER = 5     # wrong passwords per user name and address within WINDOW
FAILS_PER_ADDRESS = 50  # wrong passwords from one address within WINDOW, whatever the names (a class behind one NAT)
WINDOW = 60.0


def _cookies(scope) -> str:
    return b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")


async def _respond(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail, "error": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _same_site(scope) -> bool:
    """False for a request another site's page makes with this user's cookies (Gradio's CORS answers any
    origin, with credentials, once the app is reached by a name other than localhost). A link followed
    from elsewhere (a navigation) is fine; scripts without a browser send no Origin and pass."""
    from urllib.parse import urlsplit

    h = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    origin = h.get("origin")
    if origin is not None:
        host = (h.get("x-forwarded-host") or h.get("host") or "").split(",")[0].strip().lower()
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            return False
    return not (h.get("sec-fetch-site") in ("cross-site", "same-site") and h.get("sec-fetch-mode") != "navigate")


async def _buffered(scope, receive, limit: int = 65536):
    """The request's body (a small form or JSON), and a `receive` that hands it on unchanged."""
    body, more = b"", True
    while more and len(body) <= limit:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)

    async def replay():
        nonlocal body
        if body is not None:
            message, body = {"type": "http.request", "body": body, "more_body": more}, None
            return message
        return await receive()
    return body, replay


class LoginThrottle:
    def __init__(self):
        self.fails: dict[tuple, deque] = defaultdict(deque)

    def _recent(self, key, now: float) -> deque:
        q = self.fails.get(key) or deque()
        while q and now - q[0] > WINDOW:
            q.popleft()
        return q

    def wait(self, user: str, address: str) -> float:
        """Seconds to wait before this user may try again from this address (0: go ahead)."""
        now = time.monotonic()
        if len(self.fails) > 10_000:  # names an attacker made up: forget the settled ones
            for key in [k for k, q in self.fails.items() if not q or now - q[-1] > WINDOW]:
                del self.fails[key]
        waits = [WINDOW - (now - q[0]) for key, limit in (((user, address), FAILS_PER_USER), (address, FAILS_PER_ADDRESS))
                 if len(q := self._recent(key, now)) >= limit]
        return max(waits, default=0.0)

    def record(self, user: str, address: str, ok: bool) -> None:
        if ok:
            self.fails.pop((user, address), None)
            return
        now = time.monotonic()
        self.fails[(user, address)].append(now)
        self.fails[address].append(now)


class Guard:
    def __init__(self, app, ctx):
        self.app, self.ctx = app, ctx
        self.visitors: Visitors | None = ctx.visitors if ctx.space else None
        self.logins = LoginThrottle()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if not _same_site(scope):
            return await _respond(send, 403, "Requests from other sites are refused.")
        # Gradio serves files at /gradio_api/file=PATH and, still, at /gradio_api/file/PATH.
        for route in ("/file=", "/file/"):
            if route in path and not self._may_fetch(scope, path.split(route, 1)[1]):
                return await _respond(send, 403, "That file belongs to another workspace.")
        if path.rstrip("/").endswith("/deep_link"):  # a page's whole state by its session id; the app uses none
            return await _respond(send, 404, "Not found.")
        if scope.get("method") == "POST" and path.rstrip("/").endswith("/login"):
            return await self._login(scope, receive, send)
        if self.ctx.space or self.ctx.per_user:
            body, receive = await _buffered(scope, receive) if path.rstrip("/").endswith("/cancel") else (b"", receive)
            if not self._owns_page(scope, path, body):
                return await _respond(send, 403, "This page session belongs to someone else. Reload the page.")
        if self.visitors is not None and path.rstrip("/").endswith("/upload"):
            if self.visitors.of_header(_cookies(scope)) is None:
                return await _respond(send, 403, "Open the page first: uploads need its visitor cookie.")
            from .access import disk_room

            try:
                disk_room(self.ctx)
            except Exception as e:
                return await _respond(send, 507, str(e))
        if self.visitors is not None and self.visitors.of_header(_cookies(scope)) is None:
            return await self.app(scope, receive, self._with_cookie(send))
        return await self.app(scope, receive, send)

    # --- page sessions -------------------------------------------------------------------------------
    def _owns_page(self, scope, path: str, body: bytes) -> bool:
        """Gradio's routes that take a page session id (its results, heartbeat, cancel) serve only the caller
        that session belongs to (scope.py binds it at the page's first event)."""
        from urllib.parse import parse_qs

        from .scope import OWNERS

        pages = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [])
        if "/heartbeat/" in path:
            pages.append(path.rsplit("/heartbeat/", 1)[1].strip("/"))
        if body:
            try:
                pages.append(str(json.loads(body).get("session_hash", "")))
            except (ValueError, AttributeError):
                pass
        owners = {OWNERS.get(p) for p in pages} - {None}
        return not owners or owners == {self._caller(scope)}

    # --- files ---------------------------------------------------------------------------------------
    def _may_fetch(self, scope, wanted: str) -> bool:
        if "://" in wanted:
            return True  # a URL, which Gradio fetches through its own checks; no file of ours
        try:
            target = Path(os.path.abspath(wanted)).resolve()
        except (OSError, ValueError):
            return False
        root = self.ctx.root
        if target != root and root not in target.parents:
            return True  # not in the workspace: Gradio's own rules (its upload and cache folders) apply
        if not (self.ctx.space or self.ctx.per_user):
            return True
        own = self._workspace_of(scope)
        return own is not None and (target == own or own in target.parents)

    def _caller(self, scope) -> str | None:
        """Who sends this request: a Space visitor by their cookie, a lab user by Gradio's login token."""
        if self.ctx.space:
            return self.visitors.of_header(_cookies(scope))
        from starlette.requests import cookie_parser

        jar = cookie_parser(_cookies(scope))
        gradio_app = scope.get("app")  # Starlette puts the app (Gradio's) into the scope
        cid = getattr(gradio_app, "cookie_id", "")
        token = jar.get(f"access-token-{cid}") or jar.get(f"access-token-unsecure-{cid}")
        return getattr(gradio_app, "tokens", {}).get(token) if token else None

    def _workspace_of(self, scope) -> Path | None:
        who = self._caller(scope)
        return self.ctx.workspace_of(who).resolve() if who else None

    # --- the visitor cookie --------------------------------------------------------------------------
    def _with_cookie(self, send):
        from .context import SESSION_DAYS

        value = self.visitors.issue()

        async def sending(message):
            if message["type"] == "http.response.start":
                extra = Visitors.set_cookie_headers(value, SESSION_DAYS * 86400)
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        return sending

    # --- logins --------------------------------------------------------------------------------------
    async def _login(self, scope, receive, send):
        from starlette.requests import Request

        body, receive = await _buffered(scope, receive)
        if len(body) > 65536:
            return await _respond(send, 413, "A login form is a user name and a password.")

        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            # Read as Gradio reads it (a browser sends multipart, a script may send either kind); a form
            # naming several users is throttled for each of them.
            form = await Request(scope, once).form()
            users = [str(u).strip()[:200] for u in form.getlist("username")] or [""]
        except Exception:
            users = [""]
        address = (scope.get("client") or ("?",))[0]
        wait = max(self.logins.wait(user, address) for user in users)
        if wait > 0:
            return await _respond(send, 429, f"Too many wrong passwords. Try again in {int(wait) + 1} s.",
                                  [(b"retry-after", str(int(wait) + 1).encode())])

        async def noting(message):
            if message["type"] == "http.response.start":
                for user in users:
                    self.logins.record(user, address, message["status"] < 400)
            await send(message)

        await self.app(scope, receive, noting)
