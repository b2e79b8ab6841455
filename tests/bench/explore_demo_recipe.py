"""Compare recipes for the demo model: each variant trains (in parallel processes) and is scored by the
pixel classifier every N steps. This is how the `Recipe` defaults in trainer/demo/build.py were chosen.

    python tests/bench/explore_demo_recipe.py --device cuda --every 1000 [--only base,lr2e-3] [--out DIR]

On a GPU the whole set takes a few minutes; the step counts are those of the CPU build, so the scores
say what a 2-core rebuild would reach (the numbers differ slightly: other kernels, same recipe).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Measured on an H200 on 2026-11-26 (tests/bench/results/explore_demo_recipe_h200.log), with the
# defaults of then (vae_steps 1500, lr 1e-3, steps 6000): every variant drew the asked background,
# colour and shape in >= 98 % of 120 cases by step 5000; lr 2e-3 got there by step 4000, and 600 VAE
# steps were as good as 1500. Hence today's defaults: vae_steps 600, lr 2e-3, steps 4500.
VARIANTS = {
    "base": {},
    "lr1e-3": {"lr": 1e-3},
    "no-minsnr": {"min_snr": 0.0},
    "vae1500": {"vae_steps": 1500},
    "steps6000": {"steps": 6000},
}


def run_one(name: str, device: str, every: int, out: Path | None, overrides: dict) -> None:
    import torch

    from trainer.demo.build import Recipe, build, make_parts
    from trainer.demo.evaluate import cases, pipeline_images, score_images
    from trainer.sampling import _pipeline_classes

    torch.set_num_threads(2)
    r = replace(Recipe(), **{**VARIANTS[name], **overrides})
    cs = cases()
    parts_ref = {}

    def log(msg):
        print(f"[{name}] {msg}", flush=True)

    def on_check(step, unet, te):
        pipe = _pipeline_classes()[0](unet=unet, text_encoder=te, vae=parts_ref["vae"], tokenizer=parts_ref["tokenizer"],
                                      scheduler=parts_ref["scheduler"], safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).to(device)
        pipe.set_progress_bar_config(disable=True)
        for g in (3.0, 7.0):
            t = time.time()
            imgs = pipeline_images(pipe, [c[0] for c in cs], [c[1] for c in cs], guidance=g)
            s = score_images(imgs, [c[2] for c in cs])
            log(json.dumps({"variant": name, "step": step, "guidance": g, **{k: round(v, 3) for k, v in s.items()},
                            "eval_s": round(time.time() - t, 1)}))
            if out and g == 3.0:
                from PIL import Image
                grid = Image.new("RGB", (64 * 12, 64 * 4))
                for i, im in enumerate(imgs[:48]):
                    grid.paste(im, (64 * (i % 12), 64 * (i // 12)))
                grid.save(out / f"{name}-{step}.png")

    import trainer.demo.build as b

    real_make = b.make_parts

    def make_and_keep(rr):
        p = real_make(rr)
        parts_ref.update(p)
        return p

    b.make_parts = make_and_keep
    path = b.build((out or Path("/tmp")) / f"model-{name}", r, device=device, log=log, every=every, on_check=on_check)
    log(f"saved {path}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--set", default="{}", help="JSON recipe overrides for every variant")
    a = ap.parse_args()
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if a.variant:
        run_one(a.variant, a.device, a.every, out, json.loads(a.set))
        return 0
    names = [n for n in (a.only.split(",") if a.only else VARIANTS)]
    procs = [subprocess.Popen([sys.executable, __file__, "--variant", n, "--device", a.device, "--every", str(a.every),
                               "--set", a.set] + (["--out", str(out)] if out else [])) for n in names]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
