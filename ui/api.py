"""Endpoints for scripts (gradio_client): start a run from a YAML config, watch it stream, stop it.

Errors reach the script as one line (ui/scope.py wraps every handler).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import gradio as gr

from trainer.config import config_from_dict, parse_yaml
from trainer.errors import LoraLabError

from . import access


def build(ctx):
    def start_run(config_yaml: str) -> str:
        """Start training from a YAML config (the same keys as config.yaml); returns the run name."""
        if not isinstance(config_yaml, str):
            raise LoraLabError("The config must be YAML text.")
        cfg = config_from_dict(parse_yaml(config_yaml) or {})
        access.check_config(ctx, cfg)
        access.may_queue(ctx)
        return ctx.jobs.start(cfg, ctx.workspace).name

    async def watch(run_name: str) -> AsyncIterator[dict]:
        """Stream the run's state (state, step, total, loss) twice a second until it ends."""
        run = access.run(ctx, run_name)
        while True:
            st = run.status()
            yield {"state": st.get("state"), "step": st.get("step", 0), "total": st.get("total_steps"),
                   "loss": st.get("last_loss"), "error": st.get("error")}
            if st.get("state") not in ("running", "queued"):
                return
            await asyncio.sleep(0.5)  # holds no worker thread: any number of scripts may watch

    def stop_run() -> str:
        """Ask the running job to stop after its current step (it leaves a resumable checkpoint)."""
        mine = ctx.my_slot()
        if mine is None:
            return "No run of yours is going."
        ctx.jobs.stop(mine.run)
        return f"Stopping {mine.run.name}."

    def queue_position(run_name: str) -> int:
        """Place of your run in the queue (1 = next), or 0 when it is not waiting."""
        return ctx.jobs.position(access.run(ctx, run_name)) or 0

    def cancel_run(run_name: str) -> str:
        """Take your waiting run out of the queue."""
        run = access.run(ctx, run_name)
        if ctx.jobs.cancel(run):
            return f"Cancelled {run.name}."
        return f"{run.name} is not waiting in the queue."

    gr.api(start_run, api_name="start_run")
    gr.api(watch, api_name="watch", concurrency_limit=None)
    gr.api(stop_run, api_name="stop_run")
    gr.api(queue_position, api_name="queue_position")
    gr.api(cancel_run, api_name="cancel_run")
