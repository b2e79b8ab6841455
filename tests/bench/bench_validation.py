"""What the validation loss costs: the share of a run's time spent measuring it, with the defaults.

Runs the engine on the trained demo model (tiny-demo, CPU) with and without validation:
- `cpu-demo`: the preset as the tour runs it (8 images, too few to hold any out, so the loss is
  measured on all 8 training images; a checkpoint every 50 steps: 4 measurements in 150 steps);
- `defaults`: the config defaults where the preset does not set them (a checkpoint every 500 steps,
  1000 steps) on 20 images, 2 held out;
- `defaults-100`: the same on 100 images, 10 held out.
Prints the measured seconds (`validation_seconds` in status.json) against the run's whole time.

    python tests/bench/bench_validation.py [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on the import path)

from trainer.config import resolve
from trainer.data.demo import make_demo_dataset
from trainer.loop import run_job


def one(name: str, images: int, extra: dict, validation: bool, work: Path) -> dict:
    data = work / f"data-{images}"
    if not data.exists():
        make_demo_dataset(data, count=images)
    over = {"name": name, "dataset": {"source": str(data)}, "sample": {"every_n_steps": 0, "prompts": []},
            "validation": {"enabled": validation}}
    for section, values in extra.items():
        over[section] = {**over.get(section, {}), **values}
    began = time.time()
    run = run_job(resolve("cpu-demo", extra=over), work / f"ws-{name}-{validation}")
    whole = time.time() - began
    st = run.status()
    return {"case": name, "images": images, "validation": validation, "run_s": round(whole, 1),
            "validation_s": round(st.get("validation_seconds", 0.0), 1),
            "measurements": len(run.validation()), "share": f"{100 * st.get('validation_seconds', 0.0) / whole:.1f} %"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 steps instead of 1000 for the default cases")
    args = ap.parse_args()
    steps = 200 if args.quick else 1000
    cases = [("cpu-demo", 8, {}),
             ("defaults", 20, {"train": {"steps": steps}, "save": {"every_n_steps": 500}}),
             ("defaults-100", 100, {"train": {"steps": steps}, "save": {"every_n_steps": 500}})]
    work = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    rows = []
    try:
        for name, images, extra in cases:
            for validation in (False, True):
                rows.append(one(name, images, extra, validation, work))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.report("validation_cost", rows, {"steps": steps, "model": "tiny-demo, CPU, fp32"})


if __name__ == "__main__":
    main()
