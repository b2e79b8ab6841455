"""What `tiny-demo` draws: 120 fixed (prompt, seed) pairs at 64 px, scored by the pixel classifier
(trainer/demo/classify.py), with the app's default sampler (Euler a, 20 steps, guidance 7); and the
time of one image on this machine's CPU threads. Targets (issue 15): background >= 90 %, shape colour
>= 80 %, shape >= 60 %, one image under 1 s on 2 cores.

Run: .venv/bin/python tests/bench/bench_demo_model.py [--model tiny-demo] [--grid docs/demo-model-grid.png]
"""
import argparse
import statistics
import time

from common import report

import torch


def main() -> None:
    from trainer.demo.classify import classify
    from trainer.demo.evaluate import cases, score_images
    from trainer.models.load import load_base
    from trainer.sampling import generate

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-demo")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--sampler", default="euler_a")
    ap.add_argument("--grid", default="", help="also write a labelled grid of the first 48 images here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_base(a.model)
    cs = cases(a.n)
    times, images = [], []
    for prompt, seed, _ in cs:
        t = time.perf_counter()
        images.extend(generate(model, [prompt], seed=seed, steps=20, guidance_scale=a.guidance, scheduler=a.sampler))
        times.append(time.perf_counter() - t)
    s = score_images(images, [c[2] for c in cs])
    rows = [{"what": k, "right": f"{v:.1%}", "target": t} for k, v, t in
             [("background", s["background"], "90%"), ("shape colour", s["color"], "80%"), ("shape", s["shape"], "60%")]]
    rows.append({"what": "one image, 20 steps", "right": f"{statistics.median(times):.3f} s (median)", "target": "< 1 s"})
    report("demo_model", rows, {"model": a.model, "cases": a.n, "threads": a.threads, "guidance": a.guidance,
                                "sampler": a.sampler,
                                "misses": [(p, sd, seen) for (p, sd, want), im in zip(cs, images)
                                           if (seen := [classify(im)[k] for k in ("shape", "color", "background")])
                                           != list(want)][:20]})
    if a.grid:
        grid(images[:48], [c[0] for c in cs[:48]], a.grid)


def grid(images, prompts, path) -> None:
    """Pictures 4 to a row of 12, each under its prompt (the colour word and the shape), for the README."""
    from PIL import Image, ImageDraw

    cell, label = 64, 22
    g = Image.new("RGB", (cell * 12, (cell + label) * 4), "white")
    d = ImageDraw.Draw(g)
    for i, (im, p) in enumerate(zip(images, prompts)):
        x, y = cell * (i % 12), (cell + label) * (i // 12)
        g.paste(im.resize((cell, cell)), (x, y))
        words = p.split()  # "a red circle on a white background"
        d.text((x + 2, y + cell), f"{words[1]} {words[2]}", fill="black")
        d.text((x + 2, y + cell + 10), f"on {words[5]}", fill="gray")
    g.save(path)
    print(path)


if __name__ == "__main__":
    main()
