"""Run a training script unchanged and write the time of each of its optimizer steps to a JSON file.

    python tests/bench/step_clock.py TIMES.json SCRIPT.py [ARGS...]
    python tests/bench/step_clock.py TIMES.json -m MODULE [ARGS...]

The clock is torch's global optimizer post-step hook, so LoRA Lab, diffusers' example scripts and
sd-scripts are timed the same way, from inside, without their start-up (model loading, caching)
and without reading their logs. bench_cpu_peers.py runs each tool through this.
"""
import atexit
import json
import runpy
import sys
import time
from pathlib import Path


def _tolerate_cpu_only_torch():
    """PyPI's torchvision is built against CUDA torch; on a CPU-only torch its compiled operators do not
    load and it fails on import while registering their fake kernels. The training scripts use only its
    Python image transforms, so those registrations are skipped (here, in the bench, not in LoRA Lab)."""
    import torch.library

    register = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn=None, *a, **k: fn
        return register(op, *args, **kwargs)

    torch.library.register_fake = tolerant


def main():
    out, target, *rest = sys.argv[1:]
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    times: list[float] = []
    register_optimizer_step_post_hook(lambda *_: times.append(time.perf_counter()))
    atexit.register(lambda: Path(out).write_text(json.dumps(times)))
    _tolerate_cpu_only_torch()
    if target == "-m":
        module, *args = rest
        sys.argv = [module, *args]
        sys.path.insert(0, "")  # as `python -m` does: modules of the working folder
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
