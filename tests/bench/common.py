"""Shared by the benchmarks: where results go, and how they are printed."""
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "bench" / "results"


def machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def report(name: str, rows: list[dict], notes: dict) -> Path:
    """Print a table and write results/<name>.json."""
    OUT.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(f"{r[c]}".ljust(w) for c, w in zip(cols, widths)))
    for k, v in notes.items():
        print(f"{k}: {v}")
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows, **notes},
                               indent=1))
    print(f"written {path}")
    return path


def timed(fn, steps: int, device: str, warmup: int = 1) -> float:
    """Seconds per call of `fn`, after `warmup` calls, waiting for the GPU where there is one."""
    import torch

    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps
