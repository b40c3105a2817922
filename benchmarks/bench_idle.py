"""Benchmark: what the local stack costs at rest, and how long `taskserver up` takes to be ready.

Starts `taskserver up` in a throwaway home (the default database unless ``--database``), waits
until every warm interpreter has loaded, lets it settle, then samples each process's CPU time
and RSS over a window with no run anywhere. Reported per component (postgres counts the whole
postmaster family; a worker counts its warm interpreters separately) as a share of one core,
beside an idle Celery worker and Redis for scale, when they are installed.

    python benchmarks/bench_idle.py [--database postgres|sqlite] [--seconds 60]

Target (issue 10): the whole stack at rest ≤ 3 % of one core. Measured figures live in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results" / "idle.json"


def _cli(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TASKSERVER_HOME=str(home), DO_NOT_TRACK="true")
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(BIN / "taskserver"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def components(home: Path) -> dict[str, list[psutil.Process]]:
    """Each pid file's process with its descendants; warm interpreters are their own row."""
    found: dict[str, list[psutil.Process]] = {}
    for pidfile in sorted((home / "run").glob("*.pid")):
        root = psutil.Process(json.loads(pidfile.read_text())["pid"])
        family = [root, *root.children(recursive=True)]
        interpreters = [p for p in family if "warm_interpreter" in " ".join(p.cmdline())]
        found[pidfile.stem] = [p for p in family if p not in interpreters]
        if interpreters:
            found[f"{pidfile.stem} interpreters ({len(interpreters)})"] = interpreters
    return found


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def wait_warm_ready(home: Path, interpreters: int, timeout: float = 600) -> None:
    """Until the warm worker's log says each interpreter is ready (``Warm interpreter N ... ready in``)."""
    log = home / "logs" / "worker-warm.log"
    deadline = time.monotonic() + timeout
    while (log.read_text(errors="replace").count(") ready in") if log.exists() else 0) < interpreters:
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm interpreters not ready after {timeout}s; see {log}")
        time.sleep(0.5)


def sample(home: Path, seconds: float) -> dict[str, dict[str, float]]:
    rows = components(home)
    before = {name: cpu_seconds(procs) for name, procs in rows.items()}
    time.sleep(seconds)  # the measurement window itself: nothing to wait on
    return {name: {"cpu_percent_of_one_core": round(100 * (cpu_seconds(procs) - before[name]) / seconds, 2),
                   "rss_mb": round(rss_mb(procs), 1)} for name, procs in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--seconds", type=float, default=60.0, help="the idle window sampled")
    parser.add_argument("--settle", type=float, default=20.0, help="wait this long after ready before sampling")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="taskserver-bench-idle-")) / "home"
    port = psutil.Process().pid % 20000 + 30000
    report: dict = {"benchmark": "idle", "database": args.database, "window_s": args.seconds,
                    "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    try:
        began = time.monotonic()
        up = _cli(home, "up", "--port", str(port), "--database", args.database)
        if up.returncode:
            raise SystemExit(up.stdout + up.stderr)
        report["up_returned_s"] = round(time.monotonic() - began, 1)
        wait_warm_ready(home, 2)
        report["up_to_warm_ready_s"] = round(time.monotonic() - began, 1)
        time.sleep(args.settle)  # let start-up work (bootstrap events, first polls) pass
        report["components"] = sample(home, args.seconds)
        report["total_cpu_percent_of_one_core"] = round(
            sum(r["cpu_percent_of_one_core"] for r in report["components"].values()), 2)
        report["total_rss_mb"] = round(sum(r["rss_mb"] for r in report["components"].values()), 1)
    finally:
        _cli(home, "down")
    report["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"idle stack ({args.database}), {args.seconds:.0f}s window, load before {report['load_average_before']}")
    print(f"up returned after {report['up_returned_s']} s; warm interpreters ready after {report['up_to_warm_ready_s']} s")
    print("| component | CPU, % of one core | RSS (MB) |\n|---|---|---|")
    for name, row in report["components"].items():
        print(f"| {name} | {row['cpu_percent_of_one_core']:.2f} | {row['rss_mb']:.0f} |")
    print(f"| **whole stack** | **{report['total_cpu_percent_of_one_core']:.2f}** | **{report['total_rss_mb']:.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
