"""One zip with what a lab exercise hands in: images, prompts, the LoRA, the config and the loss plot."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from .errors import LoraLabError
from .runs import RunDir, disk_full, removed_on_failure


def loss_plot_png(rows: list[dict], path: Path, val_rows: list[dict] = ()) -> Path:
    """The loss curve (raw and smoothed) and the validation loss with its lowest point ringed, drawn with
    Pillow, so no plotting library is needed."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((pad, pad // 2, w - pad // 2, h - pad), outline=(180, 180, 180))
    title = "training loss (grey: per step, blue: smoothed)"
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in val_rows]
    if val:
        title += ", orange: validation"
    d.text((pad, 4), title, fill=(0, 0, 0))
    if len(losses) >= 2:
        steps = [r["step"] for r in rows if "loss" in r]
        first, last = min([steps[0]] + [s for s, _ in val]), max([steps[-1]] + [s for s, _ in val])
        values = losses + [v for _, v in val]
        lo, hi = min(values), max(values)
        span, width = (hi - lo) or 1.0, (last - first) or 1

        def xy(step, v):
            return (pad + (w - 1.5 * pad) * (step - first) / width, h - pad - (h - 1.5 * pad) * (v - lo) / span)

        d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 170, 170))
        smooth, ema = [], losses[0]
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
        if val:
            orange = (230, 120, 20)
            if len(val) > 1:
                d.line([xy(s, v) for s, v in val], fill=orange, width=2)
            for s, v in val:
                x, y = xy(s, v)
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=orange)
            best_step, best = min(val, key=lambda sv: sv[1])
            x, y = xy(best_step, best)
            d.ellipse((x - 7, y - 7, x + 7, y + 7), outline=(0, 0, 0), width=2)
            d.text((min(x + 9, w - 170), max(y - 18, pad // 2)), f"lowest {best:.4f} (step {best_step})", fill=(0, 0, 0))
        d.text((4, pad // 2), f"{hi:.3f}", fill=(0, 0, 0))
        d.text((4, h - pad - 10), f"{lo:.3f}", fill=(0, 0, 0))
        d.text((w - pad * 2, h - pad + 6), f"step {last}", fill=(0, 0, 0))
    img.save(path)
    return path


def session_files(records: list[dict]) -> tuple[list[tuple[str, object]], list[dict], list[tuple[Path, str]]]:
    """From the Test tab's records of the images made (picture, prompt, label, settings, LoRAs): the
    images named after their number, prompt and kind; one settings entry each; the LoRA files used,
    with the name each has in the zip (and in the entries and the ComfyUI workflows)."""
    from .runs import safe_name

    named, entries, loras = [], [], {}
    for i, r in enumerate(records):
        name = f"{i:03d}_{safe_name(r['prompt'])[:60]}_{safe_name(r['label'])}.png"
        named.append((name, r["image"]))
        used = []
        for path, strength in r["loras"]:
            path = Path(path)
            if path not in loras:
                loras[path] = _zip_name(path, set(loras.values()))
            used.append({"file": loras[path], "strength": strength})
        entries.append({"file": name, "prompt": r["prompt"], "label": r["label"], "base_model": r["base"],
                        "sampler": r["sampler"], "width": r["width"], "height": r["height"], "steps": r["steps"],
                        "guidance": r["guidance"], "negative_prompt": r["negative"], "seed": r["seed"],
                        "loras": used})
    return named, entries, list(loras.items())


def _zip_name(path: Path, taken: set) -> str:
    """A LoRA's file name in the zip: its own, or for a checkpoint (runs/R/checkpoints/step-000020/
    lora.safetensors) R-step-000020.safetensors; numbered where two would clash."""
    name = path.name
    if path.parent.parent.name == "checkpoints":
        name = f"{path.parent.parent.parent.name}-{path.parent.name}.safetensors"
    stem, n = name.removesuffix(".safetensors"), 2
    while name in taken:
        name, n = f"{stem}-{n}.safetensors", n + 1
    return name


def export_bundle(out: Path, images: list[tuple[str, object]], prompts: list[str], lora: Path | None,
                  run_dir: Path | None, settings: dict, extra_json: dict | None = None,
                  extra_loras: list[tuple[Path, str]] | None = None) -> Path:
    """Write the zip; `images` are (name, PIL image) pairs; `extra_json`: file name → data written as JSON;
    `extra_loras`: (file, name in the zip) of the other LoRAs the images used (checkpoints, other
    slots), under lora/ as well."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, plot = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.stem}_loss.png")
    try:
        with removed_on_failure(out.parent, tmp, plot), zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, img in images:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                z.writestr(f"images/{name}", buf.getvalue())
            z.writestr("prompts.txt", "\n".join(prompts) + "\n")
            z.writestr("settings.json", json.dumps(settings, indent=1))
            for name, data in (extra_json or {}).items():
                z.writestr(name, json.dumps(data, indent=1))
            written = set()
            for path, name in [(lora, Path(lora).name if lora else ""), *(extra_loras or [])]:
                if path is not None and Path(path).exists() and name not in written:
                    written.add(name)
                    z.write(path, f"lora/{name}")
            if run_dir is not None:
                run_dir = Path(run_dir)
                if (run_dir / "config.yaml").exists():
                    z.write(run_dir / "config.yaml", "config.yaml")
                if (run_dir / "metrics.jsonl").exists():
                    z.write(loss_plot_png(RunDir(run_dir).metrics(), plot, RunDir(run_dir).validation()), "loss.png")
                    plot.unlink()
                    z.write(run_dir / "metrics.jsonl", "metrics.jsonl")
    except OSError as e:
        if disk_full(e):
            raise LoraLabError(f"The disk is full: {out.name} was not written.",
                               "Free some space (old runs, exports), then export again.") from e
        raise
    tmp.replace(out)
    return out
