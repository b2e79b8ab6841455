"""Benchmark 3: seconds from `python app.py` to the page being served (target: under 4 s on 2 cores).
Run: .venv/bin/python tests/bench/bench_startup.py [--repeats N]"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, report

sys.path.insert(0, str(ROOT / "tests"))
from app_server import AppServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    times = []
    for _ in range(a.repeats):
        s = AppServer(Path(tempfile.mkdtemp()) / "ws")  # returns once the page answers 200
        times.append(round(s.ready_after, 2))
        s.stop()
    report("startup", [{"run": i + 1, "seconds to page served": t} for i, t in enumerate(times)],
           {"median_s": statistics.median(times), "best_s": min(times)})


if __name__ == "__main__":
    main()
