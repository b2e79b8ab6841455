"""Train tab: presets and every option, a summary before starting, the live run, and the run history."""
from __future__ import annotations

import math
import time
from pathlib import Path

import gradio as gr

from trainer import run_lock
from trainer.config import Config, list_presets, resolve
from trainer.errors import LoraLabError
from trainer.runs import delete_run, list_runs

from . import access
from .config_form import build_form, config_to_values, form_to_config
from .errors import guarded, message
from .live_panel import (LOSS_COLORS, STATE_ICON, history_update, live_update, loss_frame, sample_items, session_of,
                         streamed, watching)


def started_message(ctx, run) -> str:
    pos = ctx.jobs.position(run)
    if pos:
        return (f"Queued **{run.name}**: number {pos} in line; it starts when a device is free, and the live "
                "panel shows it then (cancel it in the run history).")
    return f"Started **{run.name}**."


def history_rows(ws) -> list[list]:
    rows = []
    for run in list_runs(ws):
        st = run.status()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.get("started", run.path.stat().st_mtime)))
        loss = st.get("last_loss")
        rows.append([run.name, STATE_ICON.get(st.get("state"), st.get("state", "?")),
                     f"{st.get('step', 0)}/{st.get('total_steps', '?')}",
                     f"{loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "—", when])
    return rows


def newest_config(ws) -> Config | None:
    """The settings of the newest run in a workspace, or None (none, or its config no longer reads)."""
    from trainer.config import load

    newest = next(iter(list_runs(ws)), None)
    try:
        return load(newest.config_path) if newest else None
    except (OSError, ValueError, LoraLabError):
        return None


def build(ctx, data):
    own = lambda: ctx.workspace / "presets"  # noqa: E731 - the caller's own presets (ctx is per caller)
    keys: list[str] = []
    with gr.Row():
        preset = gr.Dropdown(["(none)", *list_presets()], value="(none)", label="Preset", scale=1,
                             elem_id="train-preset")
        preset_info = gr.Markdown("Pick a preset to fill in settings for your card or exercise.",
                                  elem_id="train-preset-info")
    with gr.Accordion("Save these settings as a preset of your own", open=False):
        with gr.Row():
            preset_name = gr.Textbox(label="Preset name", scale=1, elem_id="preset-name")
            preset_desc = gr.Textbox(label="Description (optional)", scale=2)
            preset_save = gr.Button("Save preset", scale=0, elem_id="preset-save")
    comps = build_form(ctx.base_models())
    keys = list(comps)
    fields = [comps[k] for k in keys]
    summary = gr.Markdown(elem_id="train-summary")
    with gr.Row():
        check_btn = gr.Button("Check settings")
        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        save_btn = gr.Button("Save now", elem_id="train-save-now")
        sample_btn = gr.Button("Sample now", elem_id="train-sample-now")
    follow_btn = gr.Button("Show the run going now", visible=False, size="sm", elem_id="live-follow")
    message_box = gr.Markdown(elem_id="train-message")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", color_map=LOSS_COLORS, title="Loss", height=260,
                                elem_id="loss-plot")
        lr_plot = gr.LinePlot(x="step", y="lr", title="Learning rate", height=260)
    with gr.Row():
        samples = gr.Gallery(label="Samples", columns=4, fit_columns=False, height=260, elem_id="train-samples")
        log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="train-log")

    def dataset_values(src, split, ic, cc):
        return {"source": src or "", "split": split or "train", "image_column": ic or "image",
                "caption_column": cc or "text"}

    ds_inputs = [data["source"], data["split"], data["image_col"], data["caption_col"]]

    @guarded(1 + len(keys))
    def on_preset(name):
        if name == "(none)":
            return ["Settings as they are."] + [gr.skip()] * len(keys)
        cfg = resolve(name, own_presets=own())
        return [f"**{name}**: {list_presets(own()).get(name, '')}"] + config_to_values(cfg, keys)

    preset.change(on_preset, preset, [preset_info, *fields])

    def current(values, ds_vals) -> Config:
        return form_to_config(keys, values, ds_vals)

    @guarded(2)
    def on_save_preset(name, desc, *args):
        from trainer.config import save_preset

        from .uploads import check_space_quota

        cfg = current(list(args[:len(keys)]), dataset_values(*args[len(keys):]))
        check_space_quota(ctx, 8192, 1)  # a Space visitor's presets count towards what they may keep
        save_preset(cfg, own(), name, desc)  # the name is checked there: letters, digits, ' ', '-', '_', '.'
        # The dropdown's value stays: picking the new preset would fill the form with what it already holds.
        return (f"Saved preset **{name.strip()}**: pick it under Preset in a later session (the CLI: "
                f"`--preset \"{name.strip()}\"`)."), gr.update(choices=["(none)", *list_presets(own())])

    preset_save.click(on_save_preset, [preset_name, preset_desc, *fields, *ds_inputs], [preset_info, preset])

    @guarded(1)
    def on_check(*args):
        from trainer.plan_summary import describe, plan

        cfg = current(list(args[:len(keys)]), dataset_values(*args[len(keys):]))
        ds_summary = None
        if cfg.dataset.source:
            from trainer.data.sources import load_dataset_source
            from trainer.data.summary import summarize

            ds = load_dataset_source(access.dataset_source(ctx, cfg.dataset.source), cfg.dataset.split,
                                     cfg.dataset.image_column, cfg.dataset.caption_column)
            ds_summary = summarize(ds)
            ds_summary["captions"] = [i.caption for i in ds.items]
        return describe(plan(cfg, ds_summary), ds_summary)

    check_btn.click(on_check, [*fields, *ds_inputs], summary)
    # A setting changed after the check: the summary says it no longer describes the form (in the page alone).
    gr.on([f.change for f in fields], None, summary, summary,
          js="(s) => s && !s.startsWith('*Settings changed') ? '*Settings changed since this check: Check settings "
             "again.*\\n\\n' + s : s")

    @guarded(2)
    def on_start(request: gr.Request, *args):
        cfg = current(list(args[:len(keys)]), dataset_values(*args[len(keys):]))
        if not cfg.dataset.source:
            return "⚠️ No dataset: load one in the Dataset tab first.", gr.skip()
        access.check_config(ctx, cfg)
        access.may_queue(ctx)
        run = ctx.jobs.start(cfg, ctx.workspace)
        watch(request, run.name, unless_going=True)  # the panel follows it, unless it shows one still going
        return started_message(ctx, run), history_rows(ctx.workspace)

    history = gr.Dataframe(headers=["run", "state", "steps", "last loss", "started"], label="Runs",
                           interactive=False, elem_id="run-history", value=lambda: history_rows(ctx.workspace))
    start_btn.click(on_start, [*fields, *ds_inputs], [message_box, history])

    def command(action, said, kind=None):
        def handler():
            mine = ctx.my_slot()
            if mine is None:
                return "No run of yours is going."
            if kind and ctx.space:  # each one is more work for the shared device: within the run's caps
                from .space import on_demand

                if refused := on_demand(mine.run, kind):
                    return refused
            action(mine.run)
            return said.format(name=mine.run.name)
        return handler

    stop_btn.click(command(ctx.jobs.stop, "Stopping **{name}** after this step…"), None, message_box)
    save_btn.click(command(ctx.jobs.save_now, "**{name}**: a checkpoint will be saved after this step.", "save"),
                   None, message_box, api_name="save_now")
    sample_btn.click(command(ctx.jobs.sample_now, "**{name}**: samples will be made after this step.", "sample"),
                     None, message_box, api_name="sample_now")

    def watch(request, name: str, unless_going: bool = False) -> None:
        session = session_of(request)
        if not session:
            return
        if unless_going and watching.live.get(session) and going(watching.live[session]):
            watching.next[session] = name  # shown once the one in view has ended; *Show the run going now* at once
            return
        watching.live[session] = name
        watching.next.pop(session, None)

    def going(name: str) -> bool:
        try:
            run = access.run(ctx, name)
        except LoraLabError:
            return False
        return any(s.run.path == run.path for s in ctx.jobs.runs_in(ctx.workspace))

    def on_follow(request: gr.Request):
        mine = ctx.my_slot()
        if mine:
            watch(request, mine.run.name)

    follow_btn.click(on_follow, None, None, api_visibility="private")

    # Once after the page opens: a refreshed or second tab shows the settings of the run its live panel
    # shows — the one going, else the newest (which may have finished while the page reloaded).
    first = gr.Timer(0.5)

    def show_running_settings(source):
        mine = ctx.my_slot()
        cfg = mine.cfg if mine else newest_config(ctx.workspace)
        values = config_to_values(cfg, keys) if cfg else [gr.skip()] * len(keys)
        dataset = [gr.skip()] * len(ds_inputs)  # the run's dataset too, unless one is typed already
        if cfg and cfg.dataset.source and not (source or "").strip():
            d = cfg.dataset
            dataset = [d.source, d.split, d.image_column, d.caption_column]
        return [*values, gr.update(choices=["(none)", *list_presets(own())]), *dataset, gr.Timer(active=False)]

    first.tick(show_running_settings, data["source"], [*fields, preset, *ds_inputs, first], show_progress="hidden")

    with gr.Accordion("Run history", open=True):
        with gr.Row():
            pick = gr.Dropdown([], label="Open a run", allow_custom_value=True, elem_id="history-pick")
            refresh_btn = gr.Button("Refresh", size="sm")
            resume_btn = gr.Button("Resume", elem_id="history-resume")
            reuse_btn = gr.Button("Use these settings", elem_id="history-reuse")
            cancel_btn = gr.Button("Cancel (queued)", elem_id="history-cancel")
            delete_btn = gr.Button("Delete", variant="stop")
        history_msg = gr.Markdown(elem_id="history-message")
        with gr.Row():
            h_config = gr.Code(label="config.yaml", language="yaml")
            h_plot = gr.LinePlot(x="step", y="loss", color="series", color_map=LOSS_COLORS, title="Loss", height=260)
        with gr.Row():
            h_samples = gr.Gallery(label="Samples", columns=4, fit_columns=False, height=200)
            h_file = gr.File(label="LoRA files (final, best step, EMA)", file_count="multiple", elem_id="history-lora")

    def refresh():
        runs = [r.name for r in list_runs(ctx.workspace)]
        return history_rows(ctx.workspace), gr.update(choices=runs)

    refresh_btn.click(refresh, None, [history, pick])

    def shown_run(session, mine):
        """The run this page's live panel shows: the one it followed before while it exists, else the one
        going (or waiting), else the newest. A run seen going is kept for this page from then on (so it
        stays in view after it ends); a finished run shown only because it is the newest is not, and
        the next run that starts takes its place."""
        name = watching.live.get(session) if session else None
        if name and watching.next.get(session) and not going(name):  # started here while this one went on
            name = watching.live[session] = watching.next.pop(session)
        if name:
            try:
                return access.run(ctx, name)
            except LoraLabError:  # deleted, or no longer this caller's: show the default
                watching.live.pop(session, None)
        if mine is not None and session:
            watching.live[session] = mine.run.name
        return mine.run if mine else next(iter(list_runs(ctx.workspace)), None)

    def opened_view(name):
        """(message, config, loss plot, samples, LoRA file) of a run opened in the history."""
        try:
            run = access.run(ctx, name)
        except LoraLabError as e:
            return (message(e) if name else ""), "", loss_frame([]), [], None
        st = run.status()
        files = [run.path / Path(st[k]).name for k in ("lora", "best_lora", "ema_lora") if isinstance(st.get(k), str)]
        files = [str(f) for f in files if f.is_file()]
        info = f"{STATE_ICON.get(st.get('state'), '')} — step {st.get('step', 0)}/{st.get('total_steps', '?')}"
        if st.get("error"):
            info += f" — {st['error']} {st.get('advice', '')}"
        if st.get("stopped_early"):
            info += f" — stopped early at step {st['stopped_early']}"
        if isinstance(st.get("best_val_loss"), (int, float)):
            kept = f", kept as {st['best_lora']}" if st.get("best_lora") else ""
            info += f" — lowest validation loss {st['best_val_loss']:.4f} at step {st['best_step']}{kept}"
        return (info, run.config_path.read_text(), loss_frame(run.metrics(), run.validation()), sample_items(run),
                files or None)

    def opened_update(session, last):
        """The opened history entry again when its run changed state or made samples (it may have been
        opened while running or stopped and have finished since); else nothing."""
        name = watching.opened.get(session) if session else None
        if not name:
            return [gr.skip()] * 5, None
        try:
            run = access.run(ctx, name)
        except LoraLabError:
            return [gr.skip()] * 5, None
        st = run.status()
        key = [name, st.get("state"), len(run.samples())]
        if last is None or last[0] != name:  # just opened: open_run drew it
            return [gr.skip()] * 5, key + [st.get("step")]
        if key == last[:3]:
            if st.get("step") != last[3]:  # still training: the step in its line
                return [opened_view(name)[0]] + [gr.skip()] * 4, key + [st.get("step")]
            return [gr.skip()] * 5, last
        return list(opened_view(name)), key + [st.get("step")]

    def look(last, session=None):
        """One look at the run this page shows, the run history and the opened entry: (what to send,
        what the page now has)."""
        last_live, last_history, last_opened, last_other = last or (None, None, None, None)
        mine = ctx.my_slot()
        run = shown_run(session, mine)
        slot = next((s for s in ctx.jobs.runs_in(ctx.workspace) if run and s.run.path == run.path), None)
        latest = dict(slot.latest) if slot else {}
        if slot and ctx.jobs.position(slot.run):
            latest.update(position=ctx.jobs.position(slot.run), waiting=ctx.jobs.queue_length())
        other = None
        if run is not None and mine is not None and mine.run.path != run.path:
            other = (mine.run.name, "waiting for a device" if ctx.jobs.position(mine.run) else "running")
            latest.update(other=other)
        *live, shown = live_update(run, latest, last_live)
        *hist, known = history_update(history_rows(ctx.workspace), last_history)
        opened, opened_state = opened_update(session, last_opened)
        follow = gr.update(visible=bool(other)) if bool(other) != bool(last_other) or last is None else gr.skip()
        return [*live, *hist, follow, *opened], (shown, known, opened_state, other)

    # One stream per open page, started when it loads, instead of timers: each timer tick costs the
    # browser a whole Gradio event (~0.1 s of CPU in a page this size), a pushed update only its outputs.
    gr.on(None, streamed(look), None, [progress, loss_plot, lr_plot, log, samples, history, pick, follow_btn,
                                      history_msg, h_config, h_plot, h_samples, h_file],
          show_progress="hidden", concurrency_limit=None, api_visibility="private")

    def open_run(name, request: gr.Request = None):
        session = session_of(request)
        if session:
            if name:
                watching.opened[session] = name
            else:
                watching.opened.pop(session, None)
        return opened_view(name)

    pick.change(open_run, pick, [history_msg, h_config, h_plot, h_samples, h_file])

    def on_resume(name, request: gr.Request = None):
        try:
            run = access.run(ctx, name)
            if not ctx.jobs.slot_for(run):  # (resuming one already going says so itself)
                access.may_queue(ctx)
            run = ctx.jobs.resume(run.path)
            watch(request, run.name)
            pos = ctx.jobs.position(run)
            said = f"Resumed **{run.name}**." + (f" It waits as number {pos} for a device." if pos else "")
            return said, said + " The live panel above shows it."
        except Exception as e:  # said beside the button, where the user looks
            return gr.skip(), message(e)

    resume_btn.click(on_resume, pick, [message_box, history_msg])

    @guarded(1 + len(keys))
    def on_reuse(name):
        from trainer.config import load

        run = access.run(ctx, name)
        values = config_to_values(load(run.config_path), keys)
        return [f"The form now holds the settings of **{run.name}**: change what you like, then *Start training* "
                "(a new run; the old one stays as it is)."] + values

    reuse_btn.click(on_reuse, pick, [history_msg, *fields])

    @guarded(1)
    def on_cancel(name):
        run = access.run(ctx, name)
        if ctx.jobs.cancel(run):
            if not run.path.exists():
                return f"Cancelled {run.name}; it had not started, so it is removed."
            return f"Cancelled {run.name}; it can be resumed later."
        return "That run is not waiting in the queue."

    cancel_btn.click(on_cancel, pick, history_msg)

    @guarded(3)
    def on_delete(name):
        run = access.run(ctx, name)
        if ctx.jobs.slot_for(run) or run_lock.owner(run.path):  # the latter: trained by another app or the CLI
            return "⚠️ That run is training or waiting; stop or cancel it first.", gr.skip(), gr.skip()
        delete_run(run)
        rows, choices = refresh()
        return f"Deleted {run.name}.", rows, choices

    delete_btn.click(on_delete, pick, [history_msg, history, pick])
    return {"keys": keys, "comps": comps}
