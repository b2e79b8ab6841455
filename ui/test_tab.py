"""Test tab: the base model with LoRAs at chosen strengths, side by side with the base, and the export zip."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr

from trainer.errors import LoraLabError
from trainer.sampling import SCHEDULERS

from . import access, scope, space
from .errors import guarded
from .test_scores import picked_info, recommendation, run_of, score_records

SLOTS = 3
SESSION_MAX = 400  # images kept for the export; older ones drop out (the page says so)
SPACE_SESSION_MAX = 64  # on a Space: each page session holds its images in the server's memory


def session_text(kept: list[dict], dropped: int = 0, most: int = SESSION_MAX) -> str:
    if not kept:
        return "No images made yet: what you generate here is kept for the export."
    clicks = len({r.get("batch") for r in kept})
    text = (f"This set: **{len(kept)} images** from {clicks} generation{'s' if clicks > 1 else ''}; *Export zip* "
            "puts them all in one file.")
    if dropped:
        text += f" The oldest {dropped} dropped out (at most {most} are kept): export more often."
    return text


STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class ImageCounter:
    """Reports "image k of N" to the page's progress bar across the several generate() calls of one
    click (a comparison makes the LoRA images, then the base ones)."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def next_batch(self):
        start = self.done

        def report(i: int, n: int) -> None:
            self.done = start + i + 1  # called before image i of this call is made
            self.progress((self.done - 1) / self.total, desc=f"making image {self.done} of {self.total}")
        return report


def with_progress(fn):
    """Give a handler Gradio's progress bar as the keyword `progress`. Gradio passes gr.Progress only to
    a positional parameter with that default, so it comes first here and the handler's own inputs
    follow as they are."""
    def inner(progress=gr.Progress(), *args):
        return fn(*args, progress=progress)
    inner.__name__ = fn.__name__
    return inner


def build(ctx):
    def lora_choices():
        # Built once for every page: nobody's LoRAs where several people use the app (filled per caller
        # when the tab opens).
        return [] if (ctx.space or ctx.per_user) and not scope.visitor.get() else access.my_loras(ctx)

    gr.Markdown("Generate with your LoRA next to the base model from the same seed. Pick LoRAs from finished runs "
                "or upload one.")
    with gr.Row():
        base = gr.Dropdown(ctx.base_models(), value="tiny-demo", label="Base model", allow_custom_value=True,
                           elem_id="test-base")
        refresh = gr.Button("Refresh lists", size="sm")
    lora_boxes, strength_boxes = [], []
    for i in range(SLOTS):
        with gr.Row():
            lora_boxes.append(gr.Dropdown(lora_choices(), value=None, label=f"LoRA {i + 1}", allow_custom_value=True,
                                          elem_id=f"test-lora-{i}", scale=3))
            strength_boxes.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", scale=1))
    lora_info = gr.Markdown(elem_id="test-lora-info")
    upload = gr.File(label="Upload a LoRA (.safetensors)", file_types=[".safetensors"])
    prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="test-prompts")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        seed = gr.Number(value=1, label="Seed", precision=0)
        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=7.0, step=0.5, label="Guidance")
        width = gr.Number(value=0, label="Width (0: model's size)", precision=0)
        height = gr.Number(value=0, label="Height (0: model's size)", precision=0)
        scheduler = gr.Dropdown(list(SCHEDULERS), value="euler_a", label="Sampler")
    with gr.Row():
        gen_btn = gr.Button("Generate", variant="primary")
        compare_btn = gr.Button("Compare with base", elem_id="test-compare")
        sweep_btn = gr.Button("Strength sweep (LoRA 1)")
        grid_btn = gr.Button("Checkpoints × prompts (LoRA 1's run)")
    score_model = gr.Textbox(label="CLIP model for scores under the sweep and grid images",
                             placeholder="empty: the one LoRA 1's run scored its samples with; a folder, or a hub "
                                         "id while online", elem_id="test-score-model")
    message = gr.Markdown(elem_id="test-message")
    gallery = gr.Gallery(label="Results", columns=4, fit_columns=False, height="auto", object_fit="contain",
                         elem_id="test-gallery")
    images = gr.State([])  # the last click's images, with how each was made
    session = gr.State([])  # every image made on this page since it opened (or was cleared)
    with gr.Row():
        session_info = gr.Markdown("No images made yet: what you generate here is kept for the export.",
                                   elem_id="test-session")
        clear_btn = gr.Button("Start a new set", size="sm", elem_id="test-clear", scale=0)
    with gr.Row():
        export_btn = gr.Button("Export zip (every image made here, prompts, LoRA, config, loss plot, settings, "
                               "ComfyUI workflows)", elem_id="test-export")
        export_file = gr.File(label="Export", elem_id="test-export-file")
    with gr.Accordion("Share on the Hugging Face hub", open=False):
        with gr.Row():
            repo = gr.Textbox(label="Repository (you/name)")
            token = gr.Textbox(label="Access token (write)", type="password")
        push_btn = gr.Button("Push LoRA 1 with a model card")
        push_msg = gr.Markdown()

    common = [base, prompts, negative, seed, steps, guidance, width, height, scheduler]

    def _loras(names, strengths) -> list[tuple[Path, float]]:
        return [(access.lora(ctx, n), float(s)) for n, s in zip(names, strengths) if n]

    def model_for(spec, text, st, w, h, counter=None):
        """The base model, once the request is checked: the model is one the caller may load, and the
        prompts and sizes are within what this server draws for one click."""
        access.generation(ctx, [t for t in (text or "").splitlines() if t.strip()], st, w, h)
        spec = access.base_model(ctx, spec)
        if counter and spec not in ctx.models:  # seconds to minutes: the page says what it waits for
            counter.progress(0, desc="loading the base model (once: it stays loaded for the next images)")
        return ctx.load_model(spec)

    def prompts_for(text, first_lora) -> str:
        """The prompts typed, or else those of LoRA 1's run (its sample prompts, else its trigger word)."""
        if (text or "").strip() or not first_lora:
            return text or ""
        run = run_of(access.lora(ctx, first_lora))
        if run is None:
            return ""
        from trainer.config import load

        cfg = load(run / "config.yaml")
        return "\n".join(cfg.sample.prompts) or cfg.dataset.caption_prefix

    def gen(spec, text, neg, sd, st, g, w, h, sch, loras, counter=None):
        model = model_for(spec, text, st, w, h, counter)
        return _generate(model, text.splitlines(), neg, sd, st, g, w, h, sch, loras, counter)

    def _generate_now(model, lines, neg, sd, st, g, w, h, sch, loras, counter=None):
        from trainer.prepare import pick_device
        from trainer.sampling import for_generation, generate

        device = pick_device("auto")  # here: on ZeroGPU the GPU exists only inside this call
        for_generation(model, device)
        return generate(model, lines, int(sd), int(st), float(g), int(w or 0), int(h or 0), neg, sch, loras=loras,
                        device=device, progress=counter.next_batch() if counter else None)

    _generate = space.gpu(_generate_now)  # on ZeroGPU hardware the call asks for the GPU
    # There the call runs in another process, which cannot report back through the page's progress bar.
    shows_progress = _generate is _generate_now

    def counter_for(progress, text, batches: int):
        lines = [t for t in (text or "").splitlines() if t.strip()]
        return ImageCounter(progress, len(lines) * batches) if shows_progress and lines else None

    def made(imgs, lines, label, spec, neg, sd, st, g, sch, loras) -> list[dict]:
        """One record per image: the picture, its gallery caption, and every setting that made it."""
        return [{"image": img, "caption": f"{label} · {p}", "prompt": p, "label": label, "base": spec or "",
                 "negative": neg or "", "seed": int(sd), "steps": int(st), "guidance": float(g), "sampler": sch,
                 "width": img.size[0], "height": img.size[1],
                 "loras": [(str(path), float(strength)) for path, strength in loras]}
                for img, p in zip(imgs, lines)]

    def pack(records, note: str = ""):
        batch = time.time_ns()
        for r in records:
            r["batch"] = batch
        return note, [(r["image"], r["caption"]) for r in records], records

    def scored(records, lora, clip, sweep: bool) -> str:
        """Scores under each image (and the sweep's recommended strength); a CLIP model that does not
        load leaves the images and says why."""
        try:
            note = score_records(ctx, records, lora, clip)
            if sweep and all("score" in r for r in records) and records:
                note = (note + "\n\n" if note else "") + recommendation(ctx, records, lora)
            return note
        except LoraLabError as e:
            return f"No scores: {e.problem} {e.fix}"
        except Exception as e:  # the images are made: a scoring failure must not take them off the page
            return f"No scores: {type(e).__name__}: {e}. Check the CLIP model and the run's training images."

    def split_clip(ls):
        """The LoRA slots and strengths, and the CLIP model box (the sweep and grid have it last)."""
        return ls[:2 * SLOTS], (ls[2 * SLOTS] if len(ls) > 2 * SLOTS else "")

    @guarded(3)
    @with_progress
    def on_generate(spec, text, neg, sd, st, g, w, h, sch, *ls, progress=None):
        text = prompts_for(text, ls[0])
        loras = _loras(ls[:SLOTS], ls[SLOTS:])
        imgs = gen(spec, text, neg, sd, st, g, w, h, sch, loras, counter_for(progress, text, 1))
        lines = [t for t in text.splitlines() if t.strip()]
        return pack(made(imgs, lines, "with LoRAs" if loras else "base", spec, neg, sd, st, g, sch, loras))

    @guarded(3)
    @with_progress
    def on_compare(spec, text, neg, sd, st, g, w, h, sch, *ls, progress=None):
        text = prompts_for(text, ls[0])
        loras = _loras(ls[:SLOTS], ls[SLOTS:])
        if not loras:
            raise LoraLabError("No LoRA picked.", "Pick a LoRA in slot 1 to compare with the base model.")
        lines = [t for t in text.splitlines() if t.strip()]
        counter = counter_for(progress, text, 2)
        with_l = gen(spec, text, neg, sd, st, g, w, h, sch, loras, counter)
        without = gen(spec, text, neg, sd, st, g, w, h, sch, [], counter)
        records = []
        for a, b in zip(made(without, lines, "base", spec, neg, sd, st, g, sch, []),
                        made(with_l, lines, "with LoRA", spec, neg, sd, st, g, sch, loras)):
            records += [a, b]
        return pack(records)

    @guarded(3)
    @with_progress
    def on_sweep(spec, text, neg, sd, st, g, w, h, sch, *ls, progress=None):
        ls, clip = split_clip(ls)
        text = prompts_for(text, ls[0])
        if not ls[0]:
            raise LoraLabError("No LoRA picked.", "Pick a LoRA in slot 1.")
        lora = access.lora(ctx, ls[0])
        records, lines = [], [t for t in text.splitlines() if t.strip()]
        counter = counter_for(progress, text, len(STRENGTHS))
        for s in STRENGTHS:
            imgs = gen(spec, text, neg, sd, st, g, w, h, sch, [(lora, s)], counter)
            records += [{**r, "strength": s} for r in made(imgs, lines, f"strength {s}", spec, neg, sd, st, g, sch,
                                                           [(lora, s)])]
        return pack(records, scored(records, lora, clip, sweep=True))

    @guarded(3)
    @with_progress
    def on_grid(spec, text, neg, sd, st, g, w, h, sch, *ls, progress=None):
        ls, clip = split_clip(ls)
        text = prompts_for(text, ls[0])
        from trainer.checkpoint_lora import checkpoint_loras

        run = run_of(access.lora(ctx, ls[0])) if ls[0] else None
        if run is None:
            raise LoraLabError("LoRA 1 is not from a run.", "Pick a LoRA made by a run to compare its checkpoints.")
        records, lines = [], [t for t in text.splitlines() if t.strip()]
        checkpoints = checkpoint_loras(run)
        counter = counter_for(progress, text, len(checkpoints))
        model = model_for(spec, text, st, w, h, counter)
        for step, path in checkpoints:
            loras = [(path, float(ls[SLOTS]))]
            imgs = _generate(model, text.splitlines(), neg, sd, st, g, w, h, sch, loras, counter)
            records += made(imgs, lines, f"step {step}", spec, neg, sd, st, g, sch, loras)
        return pack(records, scored(records, access.lora(ctx, ls[0]), clip, sweep=False))

    outs = [message, gallery, images]
    ins = [*common, *lora_boxes, *strength_boxes]

    def add_to_session(batch, kept):
        """The last click's images join the session's (once: a failed click leaves the last batch as it was)."""
        kept = list(kept or [])
        if batch and not any(r.get("batch") == batch[0].get("batch") for r in kept[-len(batch):]):
            kept += batch
        most = SPACE_SESSION_MAX if ctx.space else SESSION_MAX
        dropped = max(0, len(kept) - most)
        kept = kept[dropped:]
        return kept, session_text(kept, dropped, most)

    for btn, fn, extra in ((gen_btn, on_generate, []), (compare_btn, on_compare, []),
                           (sweep_btn, on_sweep, [score_model]), (grid_btn, on_grid, [score_model])):
        btn.click(fn, ins + extra, outs).then(add_to_session, [images, session], [session, session_info],
                                              api_visibility="private")

    @guarded(1)
    def on_pick(value):
        return picked_info(ctx, value)

    lora_boxes[0].change(on_pick, lora_boxes[0], lora_info, api_visibility="private")

    def on_clear():
        return [], "Started a new set: the images above stay on screen, the next export holds only what you make " \
                   "from now on."

    clear_btn.click(on_clear, None, [session, session_info], api_visibility="private")

    @guarded(2)
    def on_export(kept, text, l0, s0, sd, st, g, spec="tiny-demo", neg="", w=0, h=0, sch="euler_a"):
        """Every image of the session, each with the settings that made it (kept in `kept`); of the form,
        only LoRA 1 and its strength are used. The other inputs stay so that /on_export keeps its API."""
        from .test_export import export_session

        out, count = export_session(ctx, kept, access.lora(ctx, l0) if l0 else None, s0)
        return f"Exported {out.name}: {count} images.", str(out)

    def mark_exported(kept, said):
        """The set line says it is exported (until the next images): the page then leaves without asking."""
        if not (kept and isinstance(said, str) and said.startswith("Exported")):
            return gr.skip()
        return session_text(kept) + f" All exported ({said.split()[1].rstrip(':')})."

    export_btn.click(on_export, [session, prompts, lora_boxes[0], strength_boxes[0], seed, steps, guidance, base,
                                 negative, width, height, scheduler], [message, export_file]).then(
        mark_exported, [session, message], session_info, api_visibility="private")

    @guarded(1 + SLOTS + 1)
    def on_upload(f):
        if f is None:
            return ["", *[gr.skip()] * SLOTS, gr.skip()]
        src = Path(getattr(f, "name", f))
        from trainer.lora_file import read_lora
        from trainer.runs import safe_name

        read_lora(src)  # refuses files that are not LoRAs before they are kept
        from .uploads import check_space_quota

        check_space_quota(ctx, src.stat().st_size, 1)
        dest = ctx.workspace / "loras" / (safe_name(src.stem) + ".safetensors")
        shutil.copy(src, dest)
        choices = lora_choices()
        return [f"Added {dest.name}.", gr.update(choices=choices, value=f"loras/{dest.name}"),
                *[gr.update(choices=choices)] * (SLOTS - 1), gr.skip()]

    upload.upload(on_upload, upload, [message, *lora_boxes, base])

    def on_refresh(first=None):
        """Current lists; LoRA 1, when empty, offers the newest run's LoRA."""
        choices = lora_choices()
        pick = gr.update(choices=choices, value=choices[0][1]) if choices and not first else gr.update(choices=choices)
        return [gr.update(choices=ctx.base_models()), pick, *[gr.update(choices=choices)] * (SLOTS - 1)]

    refresh.click(on_refresh, lora_boxes[0], [base, *lora_boxes])

    @guarded(1)
    def on_push(rep, tok, l0, pairs):
        from trainer.hub import push_lora

        if not l0:
            raise LoraLabError("No LoRA picked.", "Pick the LoRA to share in slot 1.")
        url = push_lora(access.lora(ctx, l0), rep, tok, [r["image"] for r in (pairs or [])][:4])
        return f"Pushed: {url}"

    push_btn.click(on_push, [repo, token, lora_boxes[0], images], push_msg)
    return {"refresh": refresh, "on_refresh": on_refresh, "lists": [base, *lora_boxes], "first": lora_boxes[0]}
