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

SLOTS = 3


def _run_of(lora: Path) -> Path | None:
    return lora.parent if (lora.parent / "config.yaml").exists() else None


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
    message = gr.Markdown(elem_id="test-message")
    gallery = gr.Gallery(label="Results", columns=4, height="auto", elem_id="test-gallery")
    images = gr.State([])
    with gr.Row():
        export_btn = gr.Button("Export zip (images, prompts, LoRA, config, loss plot)", elem_id="test-export")
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

    def model_for(spec, text, st, w, h):
        """The base model, once the request is checked: the model is one the caller may load, and the
        prompts and sizes are within what this server draws for one click."""
        access.generation(ctx, [t for t in (text or "").splitlines() if t.strip()], st, w, h)
        return ctx.load_model(access.base_model(ctx, spec))

    def prompts_for(text, first_lora) -> str:
        """The prompts typed, or else those of LoRA 1's run (its sample prompts, else its trigger word)."""
        if (text or "").strip() or not first_lora:
            return text or ""
        run = _run_of(access.lora(ctx, first_lora))
        if run is None:
            return ""
        from trainer.config import load

        cfg = load(run / "config.yaml")
        return "\n".join(cfg.sample.prompts) or cfg.dataset.caption_prefix

    def gen(spec, text, neg, sd, st, g, w, h, sch, loras):
        model = model_for(spec, text, st, w, h)
        return _generate(model, text.splitlines(), neg, sd, st, g, w, h, sch, loras)

    def _generate_now(model, lines, neg, sd, st, g, w, h, sch, loras):
        from trainer.prepare import pick_device
        from trainer.sampling import for_generation, generate

        device = pick_device("auto")  # here: on ZeroGPU the GPU exists only inside this call
        for_generation(model, device)
        return generate(model, lines, int(sd), int(st), float(g), int(w or 0), int(h or 0), neg, sch, loras=loras,
                        device=device)

    _generate = space.gpu(_generate_now)  # on ZeroGPU hardware the call asks for the GPU

    def pack(pairs):
        return "", [(img, cap) for img, cap in pairs], pairs

    @guarded(3)
    def on_generate(spec, text, neg, sd, st, g, w, h, sch, *ls):
        text = prompts_for(text, ls[0])
        loras = _loras(ls[:SLOTS], ls[SLOTS:])
        imgs = gen(spec, text, neg, sd, st, g, w, h, sch, loras)
        lines = [t for t in text.splitlines() if t.strip()]
        return pack([(img, f"{p} · LoRAs") for img, p in zip(imgs, lines)])

    @guarded(3)
    def on_compare(spec, text, neg, sd, st, g, w, h, sch, *ls):
        text = prompts_for(text, ls[0])
        loras = _loras(ls[:SLOTS], ls[SLOTS:])
        if not loras:
            raise LoraLabError("No LoRA picked.", "Pick a LoRA in slot 1 to compare with the base model.")
        lines = [t for t in text.splitlines() if t.strip()]
        with_l = gen(spec, text, neg, sd, st, g, w, h, sch, loras)
        without = gen(spec, text, neg, sd, st, g, w, h, sch, [])
        pairs = []
        for p, a, b in zip(lines, without, with_l):
            pairs += [(a, f"base · {p}"), (b, f"with LoRA · {p}")]
        return pack(pairs)

    @guarded(3)
    def on_sweep(spec, text, neg, sd, st, g, w, h, sch, *ls):
        text = prompts_for(text, ls[0])
        if not ls[0]:
            raise LoraLabError("No LoRA picked.", "Pick a LoRA in slot 1.")
        lora = access.lora(ctx, ls[0])
        pairs = []
        for s in (0.0, 0.25, 0.5, 0.75, 1.0):
            imgs = gen(spec, text, neg, sd, st, g, w, h, sch, [(lora, s)])
            pairs += [(img, f"strength {s}") for img in imgs]
        return pack(pairs)

    @guarded(3)
    def on_grid(spec, text, neg, sd, st, g, w, h, sch, *ls):
        text = prompts_for(text, ls[0])
        from trainer.checkpoint_lora import checkpoint_loras

        run = _run_of(access.lora(ctx, ls[0])) if ls[0] else None
        if run is None:
            raise LoraLabError("LoRA 1 is not from a run.", "Pick a LoRA made by a run to compare its checkpoints.")
        pairs = []
        model = model_for(spec, text, st, w, h)
        for step, path in checkpoint_loras(run):
            imgs = _generate(model, text.splitlines(), neg, sd, st, g, w, h, sch, [(path, float(ls[SLOTS]))])
            pairs += [(img, f"step {step} · {p}") for img, p in zip(imgs, [t for t in text.splitlines() if t.strip()])]
        return pack(pairs)

    outs = [message, gallery, images]
    ins = [*common, *lora_boxes, *strength_boxes]
    gen_btn.click(on_generate, ins, outs)
    compare_btn.click(on_compare, ins, outs)
    sweep_btn.click(on_sweep, ins, outs)
    grid_btn.click(on_grid, ins, outs)

    @guarded(2)
    def on_export(pairs, text, l0, s0, sd, st, g, spec="tiny-demo", neg="", w=0, h=0, sch="euler_a"):
        from trainer.bundle import export_bundle

        from trainer.runs import safe_name

        from .uploads import check_space_quota

        lora = access.lora(ctx, l0) if l0 else None
        text = prompts_for(text, l0)
        if not pairs:
            raise LoraLabError("Nothing to export yet.", "Generate or compare images first.")
        check_space_quota(ctx, lora.stat().st_size if lora else 0, 1)
        from trainer.comfy_workflow import api_workflow

        named = [(f"{i:02d}_{safe_name(cap.split(' · ')[0])}.png", img) for i, (img, cap) in enumerate(pairs)]
        out = ctx.workspace / "exports" / f"lora-lab-{time.strftime('%Y%m%d-%H%M%S')}.zip"
        lines = [t for t in text.splitlines() if t.strip()]
        model = ctx.models.get(access.base_model(ctx, spec)) if spec else None
        size = model.default_resolution if model else 512
        w, h = int(w or 0) or size, int(h or 0) or size
        settings = {"base_model": spec, "sampler": sch, "width": w, "height": h, "steps": int(st), "guidance": float(g),
                    "negative_prompt": neg or "", "seed": int(sd), "prompts": lines,
                    "loras": [{"file": lora.name, "strength": float(s0)}] if lora else [], "lora_strength": s0}
        workflow = api_workflow(spec, lines, neg, sd, st, g, w, h, sch, [(lora.name, float(s0))] if lora else [])
        export_bundle(out, named, lines, lora, _run_of(lora) if lora else None, settings,
                      {"comfyui_workflow_api.json": workflow})
        return f"Exported {out.name}.", str(out)

    export_btn.click(on_export, [images, prompts, lora_boxes[0], strength_boxes[0], seed, steps, guidance, base,
                                 negative, width, height, scheduler], [message, export_file])

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
        url = push_lora(access.lora(ctx, l0), rep, tok, [img for img, _ in (pairs or [])][:4])
        return f"Pushed: {url}"

    push_btn.click(on_push, [repo, token, lora_boxes[0], images], push_msg)
    return {"refresh": refresh, "on_refresh": on_refresh, "lists": [base, *lora_boxes], "first": lora_boxes[0]}
