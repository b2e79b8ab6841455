"""LoRA Lab: `python app.py` serves the app on 127.0.0.1 and opens the browser."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA Lab: train and test LoRAs for Stable Diffusion in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--workspace", default=os.environ.get("LORA_LAB_WORKSPACE", "workspace"),
                   help="folder for datasets, runs, models and exports")
    p.add_argument("--models-dir", help="an extra folder of checkpoints, e.g. ComfyUI's models/checkpoints")
    p.add_argument("--share", action="store_true", help="make a public Gradio link")
    p.add_argument("--auth", help="user:password required to open the app; several as a:pw1,b:pw2 make a lab "
                   "server where each user has a workspace of their own")
    p.add_argument("--users", help="a file of user:password lines (a lab server: a workspace per user)")
    p.add_argument("--devices", help="devices to train on, one run each, e.g. cuda:0,cuda:1 (default: every GPU)")
    p.add_argument("--no-browser", action="store_true", help="don't open a browser tab")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt pickle checkpoints (trusted files only)")
    p.add_argument("--data-dir", action="append", default=None,
                   help="a folder that users of a shared app (--share, --host, --users, Space) may read datasets "
                        "and models from (repeatable); a local launch may use any folder")
    p.add_argument("--space", action="store_true",
                   help="Hugging Face Space mode (automatic on a Space): uploads only, a workspace per session, caps")
    return p.parse_args(argv)


def calm_queue(app) -> None:
    """Gradio's queue checks for work every 1 ms when idle on Linux and macOS (50 ms on Windows): 5% of a
    2-core machine, all the time, taken from a training run on the same CPU. 20 ms is still
    instant to a person. There is no public setting, hence the private attribute, if present."""
    queue = getattr(app, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, 0.02)
        queue.progress_update_sleep_when_free = max(getattr(queue, "progress_update_sleep_when_free", 0), 0.1)


def main(argv=None) -> int:
    a = parse_args(argv)
    print("LoRA Lab: starting (heavy libraries load when first needed)…", flush=True)
    pairs = [x.strip() for x in (a.auth or "").split(",") if x.strip()]
    if a.users:
        try:
            pairs += [x.strip() for x in Path(a.users).read_text().splitlines() if x.strip() and not x.startswith("#")]
        except OSError as e:
            print(f"error: cannot read --users file: {e}", file=sys.stderr)
            return 2
    if any(":" not in x for x in pairs):
        print("error: --auth and --users take user:password", file=sys.stderr)
        return 2
    auth = [tuple(x.split(":", 1)) for x in pairs] or None
    per_user = bool(auth) and len(auth) > 1
    if auth:
        from ui.identity import folder_name

        folders: dict[str, str] = {}
        for user, _ in auth:
            other = folders.setdefault(folder_name(user).lower(), user)
            if other != user:  # e.g. Alice and alice, on a file system that ignores case
                print(f"error: the users {other!r} and {user!r} would share a workspace folder; rename one",
                      file=sys.stderr)
                return 2
    if (a.share or a.host not in ("127.0.0.1", "localhost", "::1")) and not auth and not os.environ.get("SPACE_ID"):
        print("\n" + "!" * 72 + "\n  WARNING: LoRA Lab is reachable from other machines without a password.\n"
              "  Anyone who can reach it can read files and run training. Add --auth user:password.\n"
              + "!" * 72 + "\n", file=sys.stderr, flush=True)
    # Four events at once by default. Set here rather than by `app.queue(...)`, which would build the
    # whole web app once more (0.3 s of start-up).
    os.environ.setdefault("GRADIO_DEFAULT_CONCURRENCY_LIMIT", "4")
    import ui  # noqa: F401  (first: makes the gradio import ~2 s faster, see ui/fast_import.py)
    import gradio as gr
    from starlette.middleware import Middleware

    from ui import scope, space
    from ui.context import AppContext
    from ui.guard import Guard
    from ui.page_fix import PageFix
    from ui.shell import CSS, HEAD, build_app

    in_space = a.space or space.detected()
    if in_space:
        a.host = "0.0.0.0" if os.environ.get("SPACE_ID") else a.host
        a.no_browser = True
    local = not a.share and a.host in ("127.0.0.1", "localhost", "::1")
    data_dirs = a.data_dir or []
    devices = [d.strip() for d in a.devices.split(",") if d.strip()] if a.devices else None
    if devices:
        from trainer.jobs import missing_devices

        if why := missing_devices(devices):
            print(f"error: --devices {a.devices}: {why}. Leave --devices out to train on every GPU found "
                  "(or on the CPU without one).", file=sys.stderr)
            return 2
    ctx = AppContext.create(a.workspace, a.models_dir, a.allow_pickle, space=in_space, data_dirs=data_dirs,
                            per_user=per_user and not in_space, devices=devices, local=local)
    app = build_app(ctx)
    scope.scope_handlers(app, ctx)  # each handler runs as its caller, and fails with a message
    calm_queue(app)  # the queue Blocks made for itself, with GRADIO_DEFAULT_CONCURRENCY_LIMIT (set above)
    # The workspace is served so that files shown in the page load from where they are; Guard lets each
    # caller fetch from their own workspace only.
    app.launch(server_name=a.host, server_port=a.port, share=a.share, auth=auth, inbrowser=not a.no_browser,
               theme=gr.themes.Soft(), css=CSS, head=HEAD, show_error=False, allowed_paths=[str(ctx.root)],
               blocked_paths=[str(ctx.root / ".visitor-secret")],
               max_file_size=space.MAX_UPLOAD if in_space else None,
               app_kwargs={"middleware": [Middleware(Guard, ctx=ctx), Middleware(PageFix)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
