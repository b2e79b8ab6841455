"""The Train tab's live panel: progress, loss and learning-rate curves, log and samples of a run,
read from its run folder (the source of truth), and sent to the page only where something changed.
"""
from __future__ import annotations

import asyncio
import html
import math
import logging
import time

import anyio
import gradio as gr

from trainer.runs import RunDir
from trainer.validation import TRAINING

log = logging.getLogger(__name__)

STATE_ICON = {"running": "running", "completed": "completed", "stopped": "stopped (resumable)",
              "failed": "FAILED", "interrupted": "interrupted (resumable)", "queued": "queued"}
STATE_COLOR = {"running": "#16a34a", "completed": "#4f46e5", "stopped": "#d97706", "failed": "#dc2626",
               "interrupted": "#d97706"}


MAX_POINTS = 400


def thin(rows: list[dict]) -> list[dict]:
    """At most MAX_POINTS rows (always keeping the last), so long runs don't flood the browser."""
    if len(rows) <= MAX_POINTS:
        return rows
    every = -(-len(rows) // MAX_POINTS)
    return rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])


def validation_label(val_rows: list[dict]) -> str:
    """The validation series' name: what it was measured on. It stays the same all run long (the plot keeps the
    series names of its first frame: a name with the best step in it kept its first value, and the later points
    went undrawn); the progress line says where the lowest is."""
    return "val. on train" if val_rows[-1].get("val_on") == TRAINING else "validation"


# The exported loss.png's colours (trainer/bundle.py), so the two plots read alike.
LOSS_COLORS = {"raw": "#aaaaaa", "smoothed": "#1e5ac8", "validation": "#e67814", "val. on train": "#e67814"}


def loss_frame(rows: list[dict], val_rows: list[dict] = ()):
    import pandas as pd

    if not rows:
        return None  # Gradio's plot stops drawing for good after an empty frame; None just clears it
    steps = [r["step"] for r in rows]
    raw = [r["loss"] for r in rows]
    smooth, ema = [], raw[0]
    for v in raw:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    keep = {r["step"] for r in thin(rows)}
    pts = [(st, r, sm) for st, r, sm in zip(steps, raw, smooth) if st in keep]
    steps, raw, smooth = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
    val = thin(list(val_rows))
    label = validation_label(val) if val else ""
    return pd.DataFrame({"step": steps * 2 + [r["step"] for r in val],
                         "loss": raw + smooth + [r["val_loss"] for r in val],
                         "series": ["raw"] * len(raw) + ["smoothed"] * len(raw) + [label] * len(val)})


def lr_frame(rows: list[dict]):
    import pandas as pd

    if not rows:
        return None
    rows = thin(rows)
    return pd.DataFrame({"step": [r["step"] for r in rows], "lr": [r.get("lr", 0.0) for r in rows]})


def fmt_eta(seconds) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60}s"


def progress_html(st: dict, latest: dict, name: str = "") -> str:
    step, total = st.get("step", 0), st.get("total_steps") or 1
    pct = min(100, int(100 * step / total))
    state = st.get("state", "")
    color = STATE_COLOR.get(state, "#374151")
    label = STATE_ICON.get(state, state)
    if state == "completed" and st.get("stopped_early"):
        label = f"completed (stopped early at step {st['stopped_early']})"
    bits = [f"<b style='color:{color}'>{label}</b>", f"step {step} / {total}"]
    if name:
        bits.insert(0, f"<b class='run-name'>{html.escape(name)}</b>")
    if state == "running" and latest.get("speed"):
        bits += [f"{latest['speed']:.2f} steps/s", f"ETA {fmt_eta(latest.get('eta'))}"]
    if latest.get("memory"):
        peak = f" (peak {latest['peak_memory'] / 1024**3:.1f} GB)" if latest.get("peak_memory") else ""
        bits.append(f"GPU memory {latest['memory'] / 1024**3:.1f} GB{peak}")
    if st.get("memory_by_phase"):  # status.json: a finished run's too
        bits.append("peak by phase: " + ", ".join(f"{k} {v / 1024**3:.1f}" for k, v in st["memory_by_phase"].items())
                    + " GB")
    if state == "queued" and latest.get("position"):
        bits.append(f"number {latest['position']} of {latest['waiting']} waiting for a device")
    if state == "running" and latest.get("phase"):  # loading, or making samples (which holds the ETA up)
        bits.append(f"<b>{latest['phase']}</b>")
    if isinstance(st.get("last_loss"), (int, float)) and math.isfinite(st["last_loss"]):  # none before step 1
        bits.append(f"loss {st['last_loss']:.4f}")
    if isinstance(st.get("val_loss"), (int, float)):
        bits.append(f"validation {st['val_loss']:.4f} (lowest {st['best_val_loss']:.4f} at step {st['best_step']})")
    msg = ""
    if state == "running" and st.get("memory_warning"):
        msg += f"<p class='run-warning' id='memory-warning'>⚠️ {html.escape(str(st['memory_warning']))}</p>"
    if state in ("failed", "interrupted"):
        msg = (f"<p class='run-error'><b>{html.escape(str(st.get('error', '')))}</b> "
               f"{html.escape(str(st.get('advice', '')))}</p>")
    if latest.get("other"):  # this panel stays on its run; another of the user's runs is going
        other, how = latest["other"]
        msg += (f"<p id='run-other'>Another run, <b>{html.escape(other)}</b>, is {how} now. This panel stays on "
                f"<b>{html.escape(name)}</b>; <i>Show the run going now</i> follows the other.</p>")
    return (f"<div id='run-progress' data-state='{state}' data-step='{step}'>"
            f"<div style='background:#e5e7eb;border-radius:6px;height:14px'><div style='width:{pct}%;"
            f"background:#6366f1;height:14px;border-radius:6px'></div></div><p>{' · '.join(bits)}</p>{msg}</div>")


def sample_items(run: RunDir) -> list[tuple[str, str]]:
    """(file, "step N · prompt") for each sample image of a run, oldest first."""
    from trainer.config import load

    try:
        prompts = load(run.config_path).sample.prompts
    except Exception:  # a config being rewritten or gone: label by step alone
        prompts = []
    scores = sample_scores(run)
    out = []
    for p in run.samples():
        step, _, i = p.stem.removeprefix("step").partition("_")
        label = f"step {int(step)}" if step.isdigit() else p.stem
        if i.isdigit() and int(i) < len(prompts):
            label += f" · {prompts[int(i)]}"
        if step.isdigit() and i.isdigit() and (int(step), int(i)) in scores:
            label += f" · {scores[int(step), int(i)]}"
        out.append((str(p), label))
    return out


def sample_scores(run: RunDir) -> dict[tuple[int, int], str]:
    """(step, index) → the score line of each scored sample (samples/scores.jsonl)."""
    import json

    from trainer.scores import Score

    out = {}
    path = run.samples_dir / "scores.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
            out[r["step"], r["index"]] = Score(r["likeness"], r["prompt"], r["nearest"], r["similarity"]).caption()
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short
    return out


# No run in this workspace yet: the progress line says so, the curves, log and gallery are cleared.
EMPTY = ("<div id='run-progress' data-state='none'><p>No run yet. Start one above.</p></div>", None, None, "", [])


PLOT_EVERY = 6.0  # seconds between curve redraws while a run trains (drawing a plot is the page's dearest work)


def _size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def live_update(run: RunDir | None, latest: dict, last: dict | None):
    """(progress, loss plot, LR plot, log, samples, new state): each part only when it changed.

    `last` is what this page was sent before. A page that sees nothing new gets nothing, so neither
    the server nor the browser does work for it.
    """
    if run is None:
        if isinstance(last, dict) and last.get("run", "") is None:
            return (gr.skip(),) * 5 + (last,)
        return (*EMPTY, {"run": None})
    last = last if isinstance(last, dict) and last.get("run") == run.name else {}
    st = run.status()
    now = time.time()
    state = {"run": run.name, "progress": progress_html(st, latest, run.name), "metrics": _size(run.metrics_path),
             "log": _size(run.log_path), "samples": len(run.samples()), "plotted_at": last.get("plotted_at", 0.0)}
    out = [gr.skip()] * 5
    if state["progress"] != last.get("progress"):
        out[0] = state["progress"]
    settled = st.get("state") not in ("running", "queued")
    if state["metrics"] != last.get("metrics") and (settled or now - state["plotted_at"] >= PLOT_EVERY):
        rows = run.metrics()
        out[1], out[2] = loss_frame(rows, run.validation()), lr_frame(rows)
        state["plotted_at"] = now
    else:
        state["metrics"] = last.get("metrics")  # not drawn yet: compare against what the page has
    if state["log"] != last.get("log"):
        out[3] = run.log_path.read_text(encoding="utf-8")[-4000:] if run.log_path.exists() else ""
    if state["samples"] != last.get("samples"):
        out[4] = sample_items(run)
    return (*out, state)


HISTORY_EVERY = 15.0  # seconds between history-table refreshes for a running run's step and loss


def history_update(rows: list[list], last: dict | None):
    """(table, dropdown choices, new state) for the run history: at once when runs come or go or change
    state, and a running run's steps and loss every HISTORY_EVERY seconds; the dropdown's choices only
    when runs come or go, so an open dropdown is not disturbed."""
    names, states, now = [r[0] for r in rows], [r[:2] for r in rows], time.time()
    if last is not None and (rows == last["rows"] or (states == last["states"] and now - last["at"] < HISTORY_EVERY)):
        return gr.skip(), gr.skip(), last
    choices = gr.update(choices=names) if last is None or names != last["names"] else gr.skip()
    return rows, choices, {"names": names, "states": states, "rows": rows, "at": now}


def is_skip(x) -> bool:
    return isinstance(x, dict) and x.get("__type__") == "update" and len(x) == 1


class Watching:
    """What each open page shows, by its Gradio session: the run in its live panel and the run opened in
    its history. A page keeps showing its run until its user picks another (Start, Resume, *Show the
    run going now*), so a queued run starting does not pull the view away from a finished one — except
    the run started on this page while the one shown was still going (`next`): that one is shown once the
    other has ended. Names kept here are checked again (access.run) whenever they are read."""

    def __init__(self):
        self.live: dict[str, str] = {}
        self.opened: dict[str, str] = {}
        self.next: dict[str, str] = {}

    def forget(self, session: str | None) -> None:
        self.live.pop(session, None)
        self.opened.pop(session, None)
        self.next.pop(session, None)


watching = Watching()


def session_of(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def streamed(look, every: float = 2.0, heartbeat: float = 30.0):
    """An async generator for a page-load event: `look(last, session)` -> (outputs, state) every `every`
    seconds, pushed to the page only when an output changed. An open page holds no thread between
    looks; a quiet page still gets an empty update every `heartbeat` seconds, because that is when
    Gradio notices a closed page and ends its stream (and what the page watched is forgotten)."""
    async def stream(request: gr.Request = None):
        last, quiet, session = None, 0.0, session_of(request)
        try:
            while True:
                try:  # file reads, off the event loop
                    out, last = await anyio.to_thread.run_sync(look, last, session)
                except Exception:  # e.g. a run folder deleted while being read: look again next time
                    log.warning("live panel: could not read the run", exc_info=True)
                    out = None
                if out is not None and (quiet >= heartbeat or not all(is_skip(x) for x in out)):
                    quiet = 0.0
                    yield out
                await asyncio.sleep(every)
                quiet += every
        finally:
            watching.forget(session)
    return stream
