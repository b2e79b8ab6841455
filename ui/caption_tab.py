"""Caption tab: edit each image's caption beside it, or change all captions at once."""
from __future__ import annotations

import gradio as gr

from trainer.data.summary import bulk_edit, caption_file, check_caption, save_caption
from trainer.errors import shown

from . import access
from .errors import guarded, message as error_message


def captioners_here() -> str:
    """Which captioners are downloaded on this machine: said when the page opens, not after a failed load."""
    from trainer.captioning import CAPTIONERS
    from trainer.hub_cache import cached

    here = [name for name, (_, repo) in CAPTIONERS.items() if cached(repo)]
    if here:
        return "Downloaded here: " + ", ".join(here) + ". Others download on first use (needs the internet)."
    return ("No captioner is downloaded on this machine yet: the first use downloads one (needs the internet), "
            "or give the folder of a downloaded model.")


def build(ctx, data):
    ds_state = data["state"]
    index = gr.State(0)
    gr.Markdown("The captions of the dataset loaded in the **Dataset** tab, saved next to each image "
                "(`name.txt`); for a Hugging Face dataset they go to `workspace/captions/`.")
    message = gr.Markdown(elem_id="caption-message")
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(label="Image", interactive=False, height=360, elem_id="caption-image")
        with gr.Column(scale=1):
            where = gr.Markdown()
            caption = gr.Textbox(label="Caption", lines=5, elem_id="caption-text")
            with gr.Row():
                prev_btn = gr.Button("◀ Previous")
                save_btn = gr.Button("Save", variant="primary", elem_id="caption-save")
                next_btn = gr.Button("Save and next ▶", elem_id="caption-next")
    with gr.Accordion("Caption automatically", open=True):
        from trainer.captioning import CAPTIONERS

        with gr.Row():
            model = gr.Dropdown(list(CAPTIONERS), value=list(CAPTIONERS)[0], label="Captioner", scale=2)
            model_path = gr.Textbox(label="Or a downloaded model folder", placeholder="optional", scale=2)
            mode = gr.Radio(["fill missing", "overwrite all"], value="fill missing", label="Which images", scale=1)
            trigger = gr.Textbox(label="Trigger word (put first)", scale=1)
        gr.Markdown(captioners_here, elem_id="caption-available")
        auto_btn = gr.Button("Caption automatically", variant="primary", elem_id="caption-auto")
        auto_log = gr.Textbox(label="New captions", lines=6, max_lines=12, elem_id="caption-auto-log")
    with gr.Accordion("Change all captions", open=True):
        with gr.Row():
            prefix = gr.Textbox(label="Put first (trigger word)", placeholder="sks")
            suffix = gr.Textbox(label="Put last")
            remove = gr.Textbox(label="Remove tags (comma-separated)")
        with gr.Row():
            find = gr.Textbox(label="Find")
            replace = gr.Textbox(label="Replace with")
        preview = gr.Markdown()
        with gr.Row():
            preview_btn = gr.Button("Preview on the first 5")
            apply_btn = gr.Button("Apply to all captions", variant="stop", elem_id="caption-apply")

    def check_writable(ds):
        """Refuse a read-only (shared) dataset before any caption is changed or a captioner loaded."""
        if ds.items:
            access.write_path(ctx, caption_file(ds.items[0], ctx.workspace / "captions"))

    def save(item, text):
        """A caption saved where the caller may write: never into a shared, read-only dataset folder."""
        captions_dir = ctx.workspace / "captions"  # a Hugging Face dataset's captions: this caller's own
        access.write_path(ctx, caption_file(item, captions_dir))
        return save_caption(item, text, captions_dir)

    def show(ds, i):
        if ds is None or not ds.items:
            return None, "No dataset loaded.", "", 0
        i = max(0, min(i, len(ds.items) - 1))
        it = ds.items[i]
        return it.load(), f"**{i + 1} / {len(ds.items)}** · `{it.name}`", it.caption, i

    @guarded(5)
    def on_save(ds, i, text, step):
        if ds is None:
            return "Load a dataset first.", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        path = save(ds.items[i], text)
        img, pos, cap, i = show(ds, i + step)
        return f"Saved {path.name}.", img, pos, cap, i

    outs = [image, where, caption, index]
    ds_state.change(lambda ds: show(ds, 0), ds_state, outs)
    prev_btn.click(lambda ds, i: show(ds, i - 1), [ds_state, index], outs)
    save_btn.click(lambda ds, i, t: on_save(ds, i, t, 0), [ds_state, index, caption], [message, *outs])
    next_btn.click(lambda ds, i, t: on_save(ds, i, t, 1), [ds_state, index, caption], [message, *outs])

    def on_preview(ds, p, s, f, r, rm):
        if ds is None:
            return "Load a dataset first."
        rows = [f"- `{shown(it.caption, 300)}` → `{shown(bulk_edit(it.caption, p, s, f, r, rm), 300)}`"
                for it in ds.items[:5]]
        return "\n".join(rows)

    def on_auto(ds, i, choice, path, how, trig, progress=gr.Progress()):
        from trainer.captioning import CAPTIONERS, Captioner, caption_items

        if ds is None:
            yield "Load a dataset first.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
            return
        if ctx.jobs.busy:
            yield ("⚠️ A training run is using the device. Caption when it has finished (or stop it).",
                   gr.skip(), gr.skip(), gr.skip(), gr.skip(), "")
            return
        todo = [it for it in ds.items if how == "overwrite all" or not it.caption.strip()]
        if not todo:
            yield ("Every image has a caption already: nothing to fill in. Pick *overwrite all* to caption them all "
                   "anew.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), "")
            return
        kind, model_id = CAPTIONERS[choice]
        progress(0, desc=f"Loading {model_id}…")
        try:
            check_writable(ds)
            cap = Captioner(kind, str(access.read_path(ctx, path)) if path.strip() else model_id)
        except Exception as e:
            yield error_message(e), gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
            return
        lines: list[str] = []
        try:
            for n, it in enumerate(todo):
                caption_items([it], cap, True, trig, save)
                lines.append(f"{it.name}: {it.caption}")
                progress((n + 1, len(todo)), desc="Captioning")
                yield f"Captioned {n + 1} of {len(todo)}.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), "\n".join(lines)
        except Exception as e:
            yield error_message(e), gr.skip(), gr.skip(), gr.skip(), gr.skip(), "\n".join(lines)
            return
        finally:
            cap.close()  # the captioning model leaves memory
        yield (f"Done: {len(lines)} captions written; the model was unloaded.", *show(ds, i), "\n".join(lines))

    auto_btn.click(on_auto, [ds_state, index, model, model_path, mode, trigger], [message, *outs, auto_log])

    preview_btn.click(on_preview, [ds_state, prefix, suffix, find, replace, remove], preview)

    @guarded(5)
    def on_apply(ds, i, p, s, f, r, rm):
        if ds is None:
            return "Load a dataset first.", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        check_writable(ds)
        edits = [(it, new) for it in ds.items if (new := check_caption(bulk_edit(it.caption, p, s, f, r, rm))) != it.caption]
        for it, new in edits:
            save(it, new)
        return (f"Changed {len(edits)} of {len(ds.items)} captions.", *show(ds, i))

    apply_btn.click(on_apply, [ds_state, index, prefix, suffix, find, replace, remove], [message, *outs])
