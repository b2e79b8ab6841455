"""The Test tab's export: every image of the page's set, with its settings, prompts, LoRAs and ComfyUI workflows."""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from trainer.errors import LoraLabError

from .test_scores import run_of
from .uploads import check_space_quota


def export_session(ctx, kept: list[dict], lora: Path | None, strength) -> tuple[Path, int]:
    """Write the zip of `kept` (the Test tab's records of the images made) into the caller's exports; `lora`
    (already checked to be the caller's) and `strength` are LoRA 1 of the form. Returns (zip, images)."""
    from trainer.bundle import export_bundle, session_files
    from trainer.comfy_workflow import workflow_api, workflow_ui

    if not kept:
        raise LoraLabError("Nothing to export yet.", "Generate or compare images first: every image made on "
                           "this page goes into the export.")
    named, entries, loras = session_files(kept)
    extra = [(p, n) for p, n in loras if p != lora]
    check_space_quota(ctx, sum(p.stat().st_size for p in [lora, *(p for p, _ in extra)] if p and p.exists()), 1,
                      "this export")
    # the time to the second, and a random part: two exports in one second (two tabs, a double click) keep both
    out = ctx.workspace / "exports" / f"lora-lab-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}.zip"
    lines = list(dict.fromkeys(e["prompt"] for e in entries))
    last = entries[-1]
    settings = {"base_model": last["base_model"], "sampler": last["sampler"], "width": last["width"],
                "height": last["height"], "steps": last["steps"], "guidance": last["guidance"],
                "negative_prompt": last["negative_prompt"], "seed": last["seed"], "prompts": lines,
                "loras": [{"file": lora.name, "strength": float(strength)}] if lora else [],
                "lora_strength": strength, "images": entries}
    api = workflow_api([{**e, "base": e["base_model"], "negative": e["negative_prompt"],
                         "loras": [(x["file"], x["strength"]) for x in e["loras"]],
                         "name": e["file"].removesuffix(".png")} for e in entries])
    # On a Space the images' size is known once written: the zip is written outside the counted folders and
    # kept only if it fits the visitor's quota.
    written = ctx.workspace / f".export-{secrets.token_hex(6)}.zip" if ctx.space else out
    export_bundle(written, named, lines, lora, run_of(lora) if lora else None, settings,
                  {"comfyui_workflow_api.json": api, "comfyui_workflow.json": workflow_ui(api)}, extra)
    if ctx.space:
        try:
            check_space_quota(ctx, written.stat().st_size, 1, "this export")
        except LoraLabError:
            written.unlink()
            raise
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written, out)
    return out, len(named)
