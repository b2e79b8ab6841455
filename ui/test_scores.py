"""Scores under the Test tab's strength-sweep and checkpoint-grid images, the strength the sweep
recommends, and what a picked LoRA file says about it. The scoring itself is trainer/scores.py."""
from __future__ import annotations

from pathlib import Path

from trainer.errors import LoraLabError

from . import access


def run_of(lora: Path) -> Path | None:
    return lora.parent if (lora.parent / "config.yaml").exists() else None


def clip_spec(ctx, text: str, lora: Path | None) -> str:
    """The CLIP model typed, else the one LoRA 1's run scored its samples with (checked like any path)."""
    text = (text or "").strip()
    run = run_of(lora) if lora else None
    if not text and run is not None:
        from trainer.config import load

        text = load(run / "config.yaml").sample.score_model
    return access.clip_model(ctx, text) if text else ""


def reference(ctx, scorer, lora: Path):
    """The training images of the LoRA's run, as the scorer compares with them."""
    from trainer.config import load
    from trainer.data.sources import load_dataset_source

    d = load(run_of(lora) / "config.yaml").dataset
    ds = load_dataset_source(access.dataset_source(ctx, d.source), d.split, d.image_column, d.caption_column,
                             d.caption_extension)
    return scorer.reference([item.load() for item in ds.items], [item.name for item in ds.items])


def score_records(ctx, records: list[dict], lora: Path | None, clip_text: str) -> str:
    """Adds each record's scores (and its caption's score line); returns what the page should say when
    there are none."""
    from trainer.scores import NEEDS_MODEL, load_scorer

    if lora is None or run_of(lora) is None:
        return "Scores compare images with the LoRA's training images: pick a LoRA made by a run here to see them."
    spec = clip_spec(ctx, clip_text, lora)
    if not spec:
        return NEEDS_MODEL.replace("set sample.score_model to", "give")
    scorer = load_scorer(spec)
    ref = reference(ctx, scorer, lora)
    for r, score in zip(records, scorer.score([r["image"] for r in records], [r["prompt"] for r in records], ref)):
        r["score"] = score.row()
        r["caption"] = f"{r['label']} · {score.caption()} · {r['prompt']}"  # scores before the long prompt
    copies = [r for r in records if r["score"]["copy"]]
    if copies:
        return (f"⚠ {len(copies)} image(s) are near-copies of a training image (e.g. {copies[0]['score']['nearest']}): "
                "the LoRA may be memorising its images; an earlier checkpoint or a lower strength may generalise better.")
    return ""


def recommendation(ctx, records: list[dict], lora: Path) -> str:
    """The strength the sweep recommends (the rule: trainer.scores.recommend_strength), written into the
    LoRA file's metadata when the file is the caller's own."""
    from trainer.scores import mean, recommend_strength, save_recommendation

    rows = []
    for s in sorted({r["strength"] for r in records}):
        mine = [r["score"] for r in records if r["strength"] == s]
        rows.append((s, mean(x["likeness"] for x in mine), mean(x["prompt"] for x in mine)))
    strength, why = recommend_strength(rows)
    table = " · ".join(f"{s:g}: likeness {like:.3f}, prompt {p:.3f}" for s, like, p in rows)
    if strength is None:
        return f"No strength recommended: {why}. ({table})"
    own = lora.resolve().is_relative_to(ctx.workspace.resolve())
    if own:
        save_recommendation(lora, strength, why)
    where = f"written into {lora.name}" if own else f"not written into {lora.name}: it is not one of your files"
    return f"**Recommended strength: {strength:g}** — {why}; {where}. ({table})"


def picked_info(ctx, value) -> str:
    """What the Test tab says under LoRA 1 when a file is picked: its recommended strength, if it has one."""
    if not value:
        return ""
    try:
        from trainer.lora_file import read_lora

        meta = read_lora(access.lora(ctx, value))[1]
    except LoraLabError:
        return ""
    if "lora_lab_recommended_strength" not in meta:
        return ""
    return (f"Recommended strength: **{meta['lora_lab_recommended_strength']}** "
            f"({meta.get('lora_lab_recommended_strength_why', 'from a strength sweep')}).")
