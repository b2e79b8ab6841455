"""Who is asking, and which workspace folder is theirs.

A lab server knows its users by Gradio's login. A Space's visitors are anonymous: each browser gets
a random id in a cookie signed with a secret only the server knows, so nobody can choose whose
workspace they get. (Gradio's session hash cannot serve: the browser picks it and sends it with
every event, so sending someone else's gave their workspace.)
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

COOKIE = "lora-lab-visitor"
LAX_COOKIE = COOKIE + "-unsecure"  # the twin for plain-http hosts, as Gradio does for its login cookie


def folder_name(who: str) -> str:
    """A folder name of its own for every distinct user name: `alice` stays `alice`, while `alice.`
    and `bob!`, which would clean to the names of others, get a hash of the exact name added."""
    from trainer.runs import safe_name

    clean = safe_name(who)
    if clean == who:
        return clean
    return f"{clean[:60]}-{hashlib.sha256(who.encode()).hexdigest()[:10]}"


class Visitors:
    """Issues and checks the signed visitor cookies of Space mode."""

    def __init__(self, root: Path):
        key_file = Path(root) / ".visitor-secret"
        try:
            self.key = key_file.read_bytes()
        except OSError:
            self.key = b""
        if len(self.key) < 32:
            self.key = secrets.token_bytes(32)
            # Kept on disk so visitors keep their workspace across an app restart; readable by the server only.
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key)

    def _sign(self, vid: str) -> str:
        return hmac.new(self.key, vid.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        vid = secrets.token_hex(16)
        return f"{vid}.{self._sign(vid)}"

    def check(self, value: str | None) -> str | None:
        """The visitor id in a cookie value, or None when it is missing or not signed by us."""
        vid, _, sig = (value or "").partition(".")
        if len(vid) == 32 and all(c in "0123456789abcdef" for c in vid) and hmac.compare_digest(sig, self._sign(vid)):
            return vid
        return None

    def of_cookies(self, cookies) -> str | None:
        return self.check(cookies.get(COOKIE)) or self.check(cookies.get(LAX_COOKIE))

    def of_header(self, header: str) -> str | None:
        # Starlette's parser, as the handlers' requests use: a cookie another page set in an odd format
        # must not make the two disagree about who is asking.
        from starlette.requests import cookie_parser

        return self.of_cookies(cookie_parser(header or ""))

    @staticmethod
    def set_cookie_headers(value: str, max_age: int) -> list[tuple[bytes, bytes]]:
        common = f"{value}; Path=/; HttpOnly; Max-Age={max_age}"
        return [(b"set-cookie", f"{COOKIE}={common}; SameSite=None; Secure; Partitioned".encode()),
                (b"set-cookie", f"{LAX_COOKIE}={common}; SameSite=Lax".encode())]
