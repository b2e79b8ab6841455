"""A fix for Gradio's page that has to run before Gradio's own scripts, put into the page by the server.

Gradio 6's status tracker counts a pending event's seconds in a requestAnimationFrame loop, and the
tracker of the app's loading screen is removed with its loop still running: the page then draws 60
frames a second for as long as it is open, about 4% of a 2-core machine taken from a training run on
it (measured with tests/bench/bench_app_overhead.py). That loop's callback is short and reads
`performance.now()-start`; the script below runs such callbacks 4 times a second instead, still often
enough for the seconds a running event shows. Gradio's own `head=` is no use here: it is added after
the tracker's module has kept its own reference to requestAnimationFrame.
"""
from __future__ import annotations

SCRIPT = b"""<script>
(() => {
  const frame = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (cb) => {
    const src = String(cb);
    return src.length < 120 && src.includes("performance.now()-")
      ? setTimeout(() => cb(performance.now()), 250) : frame(cb);
  };
})();
</script>"""


class PageFix:
    """ASGI middleware: puts SCRIPT first in the <head> of every HTML page the app serves."""

    def __init__(self, app, script: bytes = SCRIPT):
        self.app, self.script = app, script

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def send_fixed(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers:
                    start = message  # held back until the whole page is here
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks).replace(b"<head>", b"<head>" + self.script, 1)
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                message = {"type": "http.response.body", "body": body}
            await send(message)

        await self.app(scope, receive, send_fixed)
