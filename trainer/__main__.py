"""Command line: `python -m trainer train|resume|sample|tiny-model|build-demo-model|demo-dataset|presets`.

Errors a user caused end with a one-line message and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import LoraLabError


def _progress():
    from tqdm import tqdm

    bar = {"bar": None}

    def on_event(e):
        if e.kind == "step":
            if bar["bar"] is None:  # at the first step's end: its speed is known from the second on
                bar["bar"] = tqdm(total=e.data["total"], initial=e.data["step"], unit="step", dynamic_ncols=True)
            b = bar["bar"]
            b.update(e.data["step"] - b.n)
            b.set_postfix(loss=f"{e.data['loss']:.4f}", lr=f"{e.data['lr']:.2e}")
        elif e.kind == "log":
            (bar["bar"].write if bar["bar"] else print)(e.data["line"])
        elif e.kind == "sample":
            (bar["bar"].write if bar["bar"] else print)(f"sample: {e.data['path']}")
        elif e.kind == "status" and e.data.get("state") in ("completed", "stopped", "failed"):
            if bar["bar"]:
                bar["bar"].close()
    return on_event


def _quiet() -> None:
    """The libraries' own bars for loading a model from disk, and their note that an optional image package is
    missing, say nothing a user can act on; downloads keep their progress bars (huggingface_hub's own)."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    notes = logging.getLogger("transformers.utils.import_utils")
    notes.addFilter(lambda r: "requires torchvision" not in r.getMessage())


def cmd_train(a) -> int:
    from .config import resolve
    from .loop import run_job

    _quiet()
    cfg = resolve(a.preset, Path(a.config) if a.config else None, a.set, own_presets=Path(a.workspace) / "presets")
    run = run_job(cfg, Path(a.workspace), _progress())
    return _report(run)


def cmd_resume(a) -> int:
    from .config import load
    from .loop import run_job
    from .runs import open_run

    _quiet()
    run = open_run(Path(a.run_dir))
    cfg = load(run.config_path)
    if a.device:
        cfg.train.device = a.device
    if a.stdin_commands:  # run by the app: it reads the run folder, and talks to us on stdin
        from .events import StdinControl

        run_job(cfg, run.path.parent.parent, None, StdinControl(), run=run)
        return 0
    run = run_job(cfg, run.path.parent.parent, _progress(), run=run)
    return _report(run)


def _report(run) -> int:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0  # under accelerate launch, the main process reports for all
    st = run.status()
    if st.get("state") == "completed":
        print(f"done: {run.path / st['lora']}")
        return 0
    print(f"{st.get('state')}: step {st.get('step')} of {st.get('total_steps')} — resume with "
          f"`python -m trainer resume {run.path}`")
    return 0 if st.get("state") == "stopped" else 1


def cmd_sample(a) -> int:
    from .models.load import load_base
    from .sampling import for_generation, generate

    _quiet()
    loras = []
    for spec in a.lora or []:
        path, _, strength = spec.rpartition(":") if spec.count(":") and spec.rsplit(":", 1)[1].replace(".", "", 1).lstrip("-").isdigit() else (spec, "", "1")
        loras.append((Path(path), float(strength)))
    model = load_base(a.base, allow_pickle=a.allow_pickle)
    device = _device()
    for_generation(model, device)
    images = generate(model, a.prompt, seed=a.seed, steps=a.steps, guidance_scale=a.guidance, width=a.width,
                      height=a.height, negative_prompt=a.negative, loras=loras, device=device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = out / f"sample_{a.seed}_{i:02d}.png"
        img.save(path)
        print(path)
    return 0


def _device():
    from .prepare import pick_device

    return pick_device("auto")


def cmd_tiny(a) -> int:
    from .models.tiny import save_tiny

    kind = "tiny-random-xl" if a.family == "sdxl" else "tiny-random"
    print(save_tiny(Path(a.out_dir), kind))
    return 0


def cmd_build_demo(a) -> int:
    import torch

    from .demo.build import Recipe, build

    torch.set_num_threads(a.threads)
    build(Path(a.out_dir), Recipe(seed=a.seed), device=a.device)
    return 0


def cmd_demo(a) -> int:
    from .data.demo import make_demo_dataset

    print(make_demo_dataset(Path(a.out_dir), count=a.count))
    return 0


def cmd_presets(a) -> int:
    from .config import list_presets

    for name, desc in list_presets(Path(a.workspace) / "presets").items():
        print(f"{name:20s} {desc}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="LoRA Lab training engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a LoRA from a config")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--preset", help="a preset name from presets/ or WORKSPACE/presets/ (applied first)")
    t.add_argument("--workspace", default=os.environ.get("LORA_LAB_WORKSPACE", "workspace"))
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("resume", help="continue a stopped, failed or interrupted run")
    r.add_argument("run_dir")
    r.add_argument("--device", help="train on this device instead of the config's train.device (e.g. cuda:1)")
    r.add_argument("--stdin-commands", action="store_true",
                   help="take stop/save/sample lines on stdin and stop when it closes (how the app runs jobs)")
    r.set_defaults(fn=cmd_resume)
    s = sub.add_parser("sample", help="generate images with a base model and LoRAs")
    s.add_argument("--base", required=True)
    s.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]")
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--negative", default="")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=7.0)
    s.add_argument("--width", type=int, default=0)
    s.add_argument("--height", type=int, default=0)
    s.add_argument("--allow-pickle", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_sample)
    m = sub.add_parser("tiny-model", help="write a tiny model folder with random weights (tiny-random)")
    m.add_argument("out_dir")
    m.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    m.set_defaults(fn=cmd_tiny)
    b = sub.add_parser("build-demo-model", help="train the tiny demo model from scratch (about 30 min on 2 CPU cores)")
    b.add_argument("out_dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=2, help="CPU threads (the committed model was built with 2)")
    b.add_argument("--device", default="cpu")
    b.set_defaults(fn=cmd_build_demo)
    d = sub.add_parser("demo-dataset", help="write a small captioned image folder")
    d.add_argument("out_dir")
    d.add_argument("--count", type=int, default=8)
    d.set_defaults(fn=cmd_demo)
    pr = sub.add_parser("presets", help="list presets (the shipped ones, then your own)")
    pr.add_argument("--workspace", default=os.environ.get("LORA_LAB_WORKSPACE", "workspace"))
    pr.set_defaults(fn=cmd_presets)
    return p


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr)
    except OSError:  # stderr is a file on the full disk (the app's process.log): the exit code says it
        pass


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except LoraLabError as e:
        _say(f"error: {e}")
        return 2
    except OSError as e:
        from .runs import DISK_FULL, disk_full

        if not disk_full(e):
            raise
        _say(f"error: {DISK_FULL} Free some space, then try again.")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
