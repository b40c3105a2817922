"""The request lane against the bare library and Celery + Redis, in one run, on the same texts.

Compares: N single-text ``encode`` requests from ``--clients`` concurrent clients through the
request lane (embedded PostgreSQL, one drainer, batches of up to 64); the same N texts in one
batched ``encode_texts`` call (the bare library, the ceiling); the same N texts as N Celery tasks
on Redis (``celery_peer.encode_one``, 2 worker processes, one submitter). Then the idle latency of
one request, submit → result, over ``--idle-samples`` sequential requests (p50/p95). With
``--priority N``, ``--requests`` low requests are queued and N critical ones arrive while they
drain (``priority_run``). The drainer's RSS is sampled through each run.

    .venv/bin/python benchmarks/bench_requests.py --requests 10000 --clients 4 --idle-samples 100
    .venv/bin/python benchmarks/bench_requests.py --requests 10000 --priority 100 --no-celery --no-bare
    .venv/bin/python benchmarks/bench_requests.py --requests 100000 --idle-samples 10 --no-celery --no-bare
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from bench_queue import CelerySystem, bare_encode_seconds, percentile, request_texts  # noqa: E402
from platform_support import free_port  # noqa: E402  (bench_queue put tests/integration on the path)
from taskserver.platform.request_lane import DRAINER_MODULE  # noqa: E402

RESULTS = BENCH_DIR / "results" / "requests.json"
DRAINER = DRAINER_MODULE


async def lane_throughput(url: str, texts: list[str], clients: int) -> dict[str, Any]:
    """Each client submits its share one request at a time, then waits for all of its results."""
    from taskserver.platform.request_lane.client import AsyncRequestClient

    shares = [texts[i::clients] for i in range(clients)]
    submitted: list[float] = []

    async def one_client(share: list[str]) -> int:
        async with AsyncRequestClient(url) as client:
            ids = [await client.submit("encode", {"texts": [text]}, "normal") for text in share]
            submitted.append(time.perf_counter())
            records = await client.wait(ids, timeout=600)
            return sum(1 for r in records.values() if r.state == "completed")

    began = time.perf_counter()
    completed = await asyncio.gather(*(one_client(share) for share in shares))
    seconds = time.perf_counter() - began
    return {"requests": len(texts), "clients": clients, "completed": sum(completed),
            "seconds": round(seconds, 2), "per_second": round(len(texts) / seconds, 1),
            "submit_seconds": round(max(submitted) - began, 2)}  # the last client's last acknowledgement


async def idle_latency(url: str, samples: int) -> dict[str, Any]:
    from taskserver.platform.request_lane.client import AsyncRequestClient

    latencies = []
    async with AsyncRequestClient(url) as client:
        await client.result(await client.submit("encode", {"texts": ["warm up"]}), timeout=120)
        for i in range(samples):
            began = time.perf_counter()
            await client.result(await client.submit("encode", {"texts": [f"idle sample {i}"]}, "high"), 60)
            latencies.append(time.perf_counter() - began)
            await asyncio.sleep(0.05)  # idle between samples: nothing else is queued
    return {"samples": samples, "p50_seconds": round(percentile(latencies, 50), 4),
            "p95_seconds": round(percentile(latencies, 95), 4), "max_seconds": round(max(latencies), 4)}


async def priority_run(url: str, texts: list[str], critical: int) -> dict[str, Any]:
    """``len(texts)`` low requests queued, then ``critical`` critical ones arriving one by one while they drain.

    A low request "still queued when a critical one arrived" is one the drainer claimed after that
    arrival (database clock); every critical result must be written before each of them. A critical
    wait (submit to result written) is set against the median low batch's time (first claim to
    last write of one batch).
    """
    from taskserver.platform.request_lane import queue
    from taskserver.platform.request_lane.client import AsyncRequestClient

    async with AsyncRequestClient(url) as client:
        low = []
        for start in range(0, len(texts), 500):
            low += await client.submit_many([("encode", {"texts": [t]}, "low") for t in texts[start:start + 500]])
        await client.wait(low[:1], timeout=120)  # the drainer is busy with the low ones now
        urgent = []
        for i in range(critical):
            urgent.append(await client.submit("encode", {"texts": [f"critical {i}: {texts[i]}"]}, "critical"))
            await asyncio.sleep(0.05)  # arrivals spread over the drain, not one burst
        await client.wait(urgent, timeout=600)
        await client.wait(low, timeout=1800)
        conn = await queue.connect(url)
        try:
            rows = await conn.fetch(f"SELECT id, batch_id, submitted_at, started_at, finished_at FROM {queue.TABLE}"
                                    " WHERE id = ANY($1::uuid[])", [*low, *urgent])
        finally:
            await conn.close()
    by_id = {row["id"]: row for row in rows}
    lows = [by_id[i] for i in low]
    ahead = 0
    waits = []
    for row in (by_id[i] for i in urgent):
        waits.append((row["finished_at"] - row["submitted_at"]).total_seconds())
        queued_then = [r for r in lows if r["started_at"] > row["submitted_at"]]
        if all(row["finished_at"] <= r["finished_at"] for r in queued_then):
            ahead += 1
    batches: dict[Any, list[Any]] = {}
    for r in lows:
        batches.setdefault(r["batch_id"], []).append(r)
    batch_seconds = sorted((max(r["finished_at"] for r in b) - min(r["started_at"] for r in b)).total_seconds()
                           for b in batches.values())
    median_batch = batch_seconds[len(batch_seconds) // 2]
    drained = (max(r["finished_at"] for r in lows) - min(r["started_at"] for r in lows)).total_seconds()
    p95 = percentile(waits, 95)
    return {"low": len(low), "critical": len(urgent), "critical_ahead_of_queued_low_percent": 100 * ahead / len(urgent),
            "critical_wait_p50_seconds": round(percentile(waits, 50), 3), "critical_wait_p95_seconds": round(p95, 3),
            "critical_wait_max_seconds": round(max(waits), 3), "low_batches": len(batch_seconds),
            "low_batch_median_seconds": round(median_batch, 3), "p95_within_one_batch": p95 <= median_batch,
            "low_drained_per_second": round(len(lows) / drained, 1)}  # all queued first: the drainer's own rate


class RssSampler:
    """The drainer's resident memory once a second while a run lasts: first, last and peak, in MiB."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[float] = []

    async def __aenter__(self) -> "RssSampler":
        self.task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        self.samples.append(self._rss())

    def _rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    async def _sample(self) -> None:
        while True:
            self.samples.append(self._rss())
            await asyncio.sleep(1)

    def report(self) -> dict[str, float]:
        tenth = max(1, len(self.samples) // 10)
        return {"first_mib": round(self.samples[0], 1), "last_mib": round(self.samples[-1], 1),
                "peak_mib": round(max(self.samples), 1),
                "first_tenth_mean_mib": round(sum(self.samples[:tenth]) / tenth, 1),
                "last_tenth_mean_mib": round(sum(self.samples[-tenth:]) / tenth, 1)}


async def measured(coroutine, pid: int) -> dict[str, Any]:
    """A lane run's figures with the drainer's memory over it."""
    async with RssSampler(pid) as rss:
        figures = await coroutine
    return {**figures, "drainer_rss": rss.report()}


def start_lane(home: Path):
    import subprocess

    from taskserver.platform.local_postgres import LocalPostgres

    postgres = LocalPostgres(home / "postgres" / "data", port=free_port())
    postgres.start()
    # The drainer's model gets the cores the bare call gets (bench_queue sets OMP_NUM_THREADS=1 for
    # Celery's two single-threaded worker processes); TASKSERVER_REQUEST_THREADS overrides it.
    env = dict(os.environ, TASKSERVER_REQUEST_DATABASE_URL=postgres.url, DO_NOT_TRACK="true")
    env.setdefault("TASKSERVER_REQUEST_THREADS", str(os.cpu_count() or 1))
    env.pop("PREFECT_API_URL", None)  # records in Prefect are a separate cost; this measures the lane
    log = home / "drainer.log"
    drainer = subprocess.Popen([sys.executable, "-m", DRAINER], env=env, stdout=open(log, "ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "draining" not in log.read_text(errors="replace"):
        if drainer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the drainer did not start; see {log}")
        time.sleep(0.2)
    return postgres, drainer


async def celery_run(home: Path, texts: list[str]) -> dict[str, Any]:
    system = CelerySystem(home / "celery", home)
    await system.start()
    try:
        warm = home / "celery-warm"
        warm.mkdir()
        await system.encode_requests(texts[:4], warm)  # each worker process loads the model first
        out = home / "celery-out"
        out.mkdir()
        return await system.encode_requests(texts, out)
    finally:
        await system.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--idle-samples", type=int, default=100)
    parser.add_argument("--no-celery", action="store_true", help="Skip the Celery + Redis peer.")
    parser.add_argument("--priority", type=int, default=0, metavar="N",
                        help="Also: --requests low requests queued, then N critical ones arriving while they drain.")
    parser.add_argument("--no-bare", action="store_true", help="Skip the bare call (and so the lane ÷ bare ratio).")
    args = parser.parse_args()
    texts = request_texts(args.requests)
    home = Path(tempfile.mkdtemp(prefix="bench-requests-"))
    report: dict[str, Any] = {"load_average_before": os.getloadavg()}
    postgres, drainer = start_lane(home)
    try:
        report["lane"] = asyncio.run(measured(lane_throughput(postgres.url, texts, args.clients), drainer.pid))
        report["idle"] = asyncio.run(idle_latency(postgres.url, args.idle_samples))
        if args.priority:
            report["priority"] = asyncio.run(measured(priority_run(postgres.url, texts, args.priority), drainer.pid))
    finally:
        drainer.terminate()
        drainer.wait(30)
        postgres.stop()
    threads = re.search(r"(\d+) threads\)", (home / "drainer.log").read_text(errors="replace"))
    report["drainer_threads"] = int(threads.group(1)) if threads else None  # as the drainer logged it
    if not args.no_bare:
        report["bare"] = bare_encode_seconds(texts)
        report["lane_vs_bare"] = round(report["lane"]["per_second"] / report["bare"]["per_second"], 3)
    print(json.dumps(report, indent=2), flush=True)  # kept even if the peer fails below
    if not args.no_celery:
        try:
            report["celery"] = asyncio.run(celery_run(home, texts))
        except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, the lane's figures kept
            report["celery"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "per_second" in report.get("celery", {}):
        report["lane_vs_celery"] = round(report["lane"]["per_second"] / report["celery"]["per_second"], 2)
    report["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
