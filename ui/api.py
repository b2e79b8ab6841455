"""Endpoints for scripts (gradio_client): start a run from a YAML config, watch it stream, stop it."""
from __future__ import annotations

import time
from collections.abc import Iterator

import gradio as gr
import yaml

from trainer.config import config_from_dict
from trainer.errors import LoraLabError
from trainer.runs import RunDir


def build(ctx):
    def start_run(config_yaml: str) -> str:
        """Start training from a YAML config (the same keys as config.yaml); returns the run name."""
        try:
            data = yaml.safe_load(config_yaml) or {}
        except yaml.YAMLError as e:
            raise gr.Error(f"The config is not valid YAML: {e}")
        try:
            cfg = config_from_dict(data)
            cfg.dataset.source = ctx.dataset_source(cfg.dataset.source)
            cfg.model.allow_pickle = ctx.allow_pickle
            ctx.check_start(cfg)
            return ctx.jobs.start(cfg, ctx.workspace).name
        except LoraLabError as e:
            raise gr.Error(str(e))

    def watch(run_name: str) -> Iterator[dict]:
        """Stream the run's state (state, step, total, loss) twice a second until it ends."""
        path = ctx.workspace / "runs" / run_name
        if not run_name or not path.is_dir():
            raise gr.Error(f"There is no run '{run_name}'.")
        run = RunDir(path)
        while True:
            st = run.status()
            yield {"state": st.get("state"), "step": st.get("step", 0), "total": st.get("total_steps"),
                   "loss": st.get("last_loss"), "error": st.get("error")}
            if st.get("state") not in ("running", "queued"):
                return
            time.sleep(0.5)

    def stop_run() -> str:
        """Ask the running job to stop after its current step (it leaves a resumable checkpoint)."""
        mine = ctx.my_slot()
        if mine is None:
            return "No run of yours is going."
        ctx.jobs.stop(mine.run)
        return f"Stopping {mine.run.name}."

    def queue_position(run_name: str) -> int:
        """Place of your run in the queue (1 = next), or 0 when it is not waiting."""
        path = ctx.workspace / "runs" / run_name
        return ctx.jobs.position(RunDir(path)) or 0 if path.is_dir() else 0

    def cancel_run(run_name: str) -> str:
        """Take your waiting run out of the queue."""
        path = ctx.workspace / "runs" / run_name
        if path.is_dir() and ctx.jobs.cancel(RunDir(path)):
            return f"Cancelled {run_name}."
        return f"{run_name} is not waiting in the queue."

    gr.api(start_run, api_name="start_run")
    gr.api(watch, api_name="watch")
    gr.api(stop_run, api_name="stop_run")
    gr.api(queue_position, api_name="queue_position")
    gr.api(cancel_run, api_name="cancel_run")
