"""Runs every benchmark in turn, full size (``--quick`` for a smoke run), and keeps each one's output.

Each benchmark compares against its baseline in its own process and prints a table; this only
sequences them so they never share the CPU, and saves the output under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_encode", "bench_pdfs", "bench_cluster", "bench_train", "bench_quality", "bench_queue"]
NO_QUICK = {"bench_quality"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark that has it")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. bench_encode,bench_cluster")
    args = parser.parse_args()
    chosen = [name for name in BENCHMARKS if not args.only or name in args.only.split(",")]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for name in chosen:
        argv = [sys.executable, str(HERE / f"{name}.py")]
        if args.quick and name not in NO_QUICK:
            argv.append("--quick")
        started = time.perf_counter()
        print(f"== {name} ({' '.join(argv[2:]) or 'full'})", flush=True)
        with open(results / f"{name}.txt", "w") as log:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log.write(done.stdout)
        print(done.stdout[-4000:], flush=True)
        print(f"== {name}: exit {done.returncode} in {time.perf_counter() - started:.0f}s", flush=True)
        if done.returncode:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
