"""How fast a LoRA learns the demo concept: the share of pictures drawn in the concept colour (pink,
by the pixel classifier) against training steps, for each adapter algorithm, with the cpu-demo preset
on the trained demo model; 12 fixed (prompt, seed) pairs per checkpoint. Writes a JSON result and a
chart (docs/learning-curve.png) for the README. The cpu-demo preset's step count is set from this.

Run: .venv/bin/python tests/bench/bench_learning.py [--steps 120] [--every 10] [--chart docs/learning-curve.png]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, report

import torch

ALGORITHMS = ["lora", "loha", "lokr", "dora"]
COLOURS = {"lora": (40, 90, 230), "loha": (220, 40, 40), "lokr": (40, 170, 60), "dora": (140, 60, 200)}


def adapter_at(cfg, checkpoint: Path):
    """The base model with the adapter exactly as a checkpoint holds it (every algorithm, LoKr too)."""
    from trainer.adapters import add_adapter, load_adapter_state
    from trainer.checkpoint import load_checkpoint
    from trainer.models.load import load_base

    model = load_base(cfg.model.base)
    add_adapter(model.unet, cfg.network)
    if cfg.network.train_text_encoder:
        for te in model.text_encoders:
            add_adapter(te, cfg.network, text_encoder=True)
    adapter, _, _ = load_checkpoint(checkpoint)
    load_adapter_state(model.unet, {k[5:]: v for k, v in adapter.items() if k.startswith("unet.")})
    for i, te in enumerate(model.text_encoders if cfg.network.train_text_encoder else []):
        load_adapter_state(te, {k[4:]: v for k, v in adapter.items() if k.startswith(f"te{i}.")})
    return model


_BASE: dict = {}


def base_share(cfg) -> float:
    """The concept share of the base model alone (step 0), measured once."""
    if cfg.model.base not in _BASE:
        from trainer.demo.evaluate import concept_cases, concept_share
        from trainer.models.load import load_base
        from trainer.sampling import generate

        model = load_base(cfg.model.base)
        _BASE[cfg.model.base] = concept_share([img for prompt, seed in concept_cases(12) for img in generate(
            model, [prompt], seed=seed, steps=20, guidance_scale=cfg.sample.guidance_scale)])
    return _BASE[cfg.model.base]


def curve(algorithm: str, steps: int, every: int, data: Path, work: Path, over: dict | None = None
          ) -> tuple[list[tuple[int, float]], float]:
    from trainer.checkpoint import _dirs
    from trainer.config import resolve
    from trainer.demo.evaluate import concept_cases, concept_share, pinkness
    from trainer.loop import run_job
    from trainer.sampling import generate

    from trainer.config import merge

    extra = {"name": algorithm, "dataset": {"source": str(data)}, "network": {"algorithm": algorithm},
             "train": {"steps": steps}, "save": {"every_n_steps": every, "keep_last": 1000},
             "sample": {"every_n_steps": 0}}
    cfg = resolve("cpu-demo", extra=merge(extra, over or {}))
    t = time.perf_counter()
    run = run_job(cfg, work)
    took = time.perf_counter() - t
    points = [(0, base_share(cfg))]
    for ck in _dirs(run.checkpoints_dir):
        model = adapter_at(cfg, ck)
        images = [img for prompt, seed in concept_cases(12)
                  for img in generate(model, [prompt], seed=seed, steps=20, guidance_scale=cfg.sample.guidance_scale)]
        points.append((int(ck.name.split("-")[1]), concept_share(images)))
        print(f"{algorithm} step {points[-1][0]}: {points[-1][1]:.0%} pink, pinkness {pinkness(images):.2f}", flush=True)
    return points, took


def chart(curves: dict, steps: int, path: Path, preset_steps: int) -> None:
    """A line chart drawn with Pillow (no plotting library is a dependency)."""
    from PIL import Image, ImageDraw

    w, h, left, bottom, top = 640, 320, 50, 40, 20
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x = lambda s: left + (w - left - 20) * s / steps  # noqa: E731
    y = lambda v: h - bottom - (h - bottom - top) * v  # noqa: E731
    d.line([(left, y(0)), (w - 20, y(0))], fill="black")
    d.line([(left, y(0)), (left, y(1))], fill="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([(left - 4, y(v)), (w - 20, y(v))], fill=(225, 225, 225) if v else "black")
        d.text((8, y(v) - 6), f"{v:.0%}", fill="black")
    for s in range(0, steps + 1, max(1, steps // 6)):
        d.text((x(s) - 8, h - bottom + 6), str(s), fill="black")
    d.line([(x(preset_steps), y(0)), (x(preset_steps), y(1))], fill=(160, 160, 160))
    d.text((x(preset_steps) + 4, top), "cpu-demo preset", fill=(100, 100, 100))
    d.text((w // 2 - 60, h - 18), "training steps", fill="black")
    for i, (alg, pts) in enumerate(curves.items()):
        pts = [(s, v or 0.0) for s, v in pts]
        d.line([(x(s), y(v)) for s, v in pts], fill=COLOURS[alg], width=3)
        d.text((left + 12 + 70 * i, top), alg, fill=COLOURS[alg])
    img.save(path)
    print(path)


def main() -> None:
    from trainer.config import preset_dict
    from trainer.data.demo import make_demo_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--chart", default=str(ROOT / "docs" / "learning-curve.png"))
    ap.add_argument("--set", default="{}", help="JSON config overrides over the preset, to explore")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    data = make_demo_dataset(work / "data")
    curves, rows = {}, []
    for alg in a.algorithms.split(","):
        pts, took = curve(alg, a.steps, a.every, data, work, json.loads(a.set))
        curves[alg] = pts
        first = next((s for s, v in pts if v is not None and v >= 0.75), None)
        rows.append({"algorithm": alg, "train_s": round(took, 1), "first step >= 75 %": first,
                     **{f"@{s}": f"{v:.0%}" for s, v in pts if v is not None and s % (a.every * 2) == 0}})
    preset_steps = preset_dict("cpu-demo")["train"]["steps"]
    report("learning", rows, {"steps": a.steps, "every": a.every, "curves": curves, "preset_steps": preset_steps})
    chart(curves, a.steps, Path(a.chart), preset_steps)


if __name__ == "__main__":
    main()
