"""ASGI middleware in front of Gradio for the shared modes (a lab server, a Space).

- Gradio's file route (`/gradio_api/file=PATH`) serves the workspace folder to anyone logged in;
  here a path inside the workspace is served only when it lies in the caller's own workspace.
- Space visitors get their signed visitor cookie (see identity.py) on their first request.
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
        # Gradio serves files at /gradio_api/file=PATH and, still, at /gradio_api/file/PATH.
        for route in ("/file=", "/file/"):
            if route in path and not self._may_fetch(scope, path.split(route, 1)[1]):
                return await _respond(send, 403, "That file belongs to another workspace.")
        if scope.get("method") == "POST" and path.rstrip("/").endswith("/login"):
            return await self._login(scope, receive, send)
        if self.visitors is not None and self.visitors.of_header(_cookies(scope)) is None:
            return await self.app(scope, receive, self._with_cookie(send))
        return await self.app(scope, receive, send)

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

    def _workspace_of(self, scope) -> Path | None:
        if self.ctx.space:
            who = self.visitors.of_header(_cookies(scope))
        else:
            gradio_app = scope.get("app")  # Starlette puts the app (Gradio's) into the scope
            from http.cookies import SimpleCookie

            jar = SimpleCookie()
            jar.load(_cookies(scope))
            cid = getattr(gradio_app, "cookie_id", "")
            token = next((jar[k].value for k in (f"access-token-{cid}", f"access-token-unsecure-{cid}") if k in jar), None)
            who = getattr(gradio_app, "tokens", {}).get(token) if token else None
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

        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
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
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def noting(message):
            if message["type"] == "http.response.start":
                for user in users:
                    self.logins.record(user, address, message["status"] < 400)
            await send(message)

        await self.app(scope, replay, noting)
