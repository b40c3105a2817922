"""Benchmark: the priority lane's queueing behaviour, taskserver against Prefect's stock worker and Celery.

Systems (one at a time, same scenarios, same process run, printed side by side):
  * ``prefect-10s`` / ``prefect-1s``: Prefect's stock process worker (``--type process``) polling every 10 s
    (Prefect's default) and every 1 s, on the platform's pools and priority queues;
  * ``taskserver-1s``: taskserver's ``PriorityProcessWorker`` (``taskserver-process``) polling every 1 s;
  * ``celery``: Celery 5 + Redis, one list per priority consumed in order (``-Q critical,high,normal,low``
    with ``queue_order_strategy='priority'``), concurrency 2, prefetch multiplier 1, ``acks_late``.
Every worker has 2 slots. Every run is taskserver's ``probe`` flow (or the Celery task in ``celery_peer.py``,
which writes the same records), so body start times are read the same way for all systems.

Scenarios:
  1. idle latency: N runs, one at a time, each submitted to an idle worker; submit -> body start.
  2. backlog: lows, then normals (4 s each) fill both slots and queue up; then criticals (0.5 s) arrive.
     *critical wait*: the i-th critical to start, minus the i-th body end after the criticals were
     submitted (the moment a lower run finished, i.e. a slot was about to free);
     *adherence*: share of criticals whose body started before that of every lower run still waiting.
  3. no-op throughput: a burst of runs sleeping 0 s, drained by the worker; runs per minute, capped in time.
Everything runs on 127.0.0.1 under a temporary home; every process started here is stopped on exit.

    python benchmarks/bench_queue.py [--quick] [--systems prefect-10s,prefect-1s,taskserver-1s,celery]
        [--database postgres,sqlite] [--keep]

``--database`` runs every Prefect system once per database, side by side: ``postgres`` is the local
stack's default (the embedded PostgreSQL of ``taskserver.platform.local_postgres``), ``sqlite`` the
small-footprint option. The report counts the server log's database-lock, 500 and 503 lines per database.

Measured with ``--quick`` (2 shared cores, load average 2-3.5, SQLite; Prefect 3.8.8, Celery 5.7.0,
kombu 5.7.0, redis-py 8.1.0, redis-server 7.0.15), stock 10 s / stock 1 s / taskserver 1 s / Celery:
idle submit -> body p50 8.96 / 3.15 / 2.58 / 0.004 s; critical wait after a slot frees p50
8.28 / 3.87 / 3.89 / 0.003 s; adherence 3/3 everywhere; no-op runs/min 10.7 / 26.9 / 22.0 / (Celery
drains the burst faster than it is submitted). A Prefect run costs ~2.1-2.3 s of subprocess start and
imports before it reaches Running and ~1.4 s of process exit before its slot frees, whatever the poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

import psutil

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "queue.json"
sys.path.insert(0, str(REPO / "tests" / "integration"))  # server/worker process helpers live there
sys.path.insert(0, str(BENCH_DIR))

from platform_support import PrefectServer, WorkerProcess, free_port, read_done, read_starts  # noqa: E402

SLOTS = 2
LOWER = ("low", "normal")
SYSTEMS = ("prefect-10s", "prefect-1s", "taskserver-1s", "taskserver-warm", "celery")
DATABASES = ("postgres", "sqlite")
SERVER_ERROR_MARKERS = {
    "database is locked": "database is locked",
    "503 (retryable exception)": "Encountered retryable exception in request",
    "500 (exception)": "Encountered exception in request",
    "failed service loop": "Failed in consume_loop",
}
"""What the server log must not show under this load: Prefect logs every 503 and 500 it answers."""
TITLES = {
    "prefect-10s": "Prefect process worker, 10 s poll",
    "prefect-1s": "Prefect process worker, 1 s poll",
    "taskserver-1s": "taskserver-process, 1 s poll (+ run-event wake-ups)",
    "taskserver-warm": "taskserver-warm (warm lane), run-event wake-ups + the local stack's fallback poll",
    "celery": "Celery + Redis",
}
ENCODE_SYSTEMS = ("taskserver-warm", "celery")
"""The systems that also run the single-text encode requests (a model loaded once per process)."""


class BenchError(RuntimeError):
    """A scenario could not complete (timeout, a process that died): names what and where to look."""


@dataclass(frozen=True)
class Scale:
    idle_runs: int
    idle_runs_slow_poll: int
    lows: int
    normals: int
    criticals: int
    noop_runs: int
    noop_cap_s: float
    noop_cap_slow_poll_s: float
    lower_seconds: float = 4.0
    critical_seconds: float = 0.5
    encode_requests: int = 1000


QUICK = Scale(idle_runs=8, idle_runs_slow_poll=4, lows=6, normals=6, criticals=3,
              noop_runs=30, noop_cap_s=30, noop_cap_slow_poll_s=30, encode_requests=200)
FULL = Scale(idle_runs=16, idle_runs_slow_poll=6, lows=10, normals=10, criticals=5,
             noop_runs=60, noop_cap_s=75, noop_cap_slow_poll_s=50, encode_requests=1000)
# An odd number of criticals: with two slots, the last one can be picked up beside a lower run in
# the same poll, the case where a stock process worker may launch the lower run's body first.


# -- processes --------------------------------------------------------------------------------

def descendants(root: int) -> list[psutil.Process]:
    """Live descendants of ``root``: flow subprocesses may lead their own sessions, so killing the
    worker's group alone could leave them behind. psutil's Process remembers each one's start time,
    so a later signal never reaches a reused pid."""
    try:
        return psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(process: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it and every descendant that is still the same process."""
    if process is None or process.poll() is not None:
        return
    tree = descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
    for child in tree:
        try:
            child.kill()  # psutil checks the start time first: a reused pid is left alone
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=5)


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def first_starts(record_dir: Path) -> dict[str, float]:
    return {label: min(r["started"] for r in recs) for label, recs in read_starts(record_dir).items() if recs}


def duplicate_starts(record_dir: Path) -> list[str]:
    return sorted(label for label, recs in read_starts(record_dir).items() if len(recs) > 1)


# -- systems ------------------------------------------------------------------------------------

@dataclass
class Submitted:
    label: str
    at: float
    run_id: UUID | None = None


class PrefectSystem:
    """A worker (stock or taskserver) on the shared benchmark server, submitting through taskserver."""

    pool = "cpu"
    lane: str | None = None

    def __init__(self, name: str, server: PrefectServer, worker_type: str, poll_seconds: float, logs: Path):
        self.name, self.server, self.worker_type, self.poll = name, server, worker_type, poll_seconds
        self.logs = logs
        self.worker: WorkerProcess | None = None
        self.client = None

    @property
    def slow_poll(self) -> bool:
        return self.poll > 5

    async def start(self) -> None:
        from prefect.client.orchestration import get_client

        self.client = await get_client().__aenter__()
        self.worker = WorkerProcess(self.pool, SLOTS, self.server.api_url, self.logs / f"{self.name}.log",
                                    self.worker_type, str(self.poll), env=self.worker_env()).start()

    def worker_env(self) -> dict[str, str]:
        return {}

    async def submit(self, label: str, priority: str, seconds: float, record_dir: Path) -> Submitted:
        from taskserver.platform.submission import submit_async

        at = time.time()
        run_id = await submit_async("probe", priority, {"label": label, "record_dir": str(record_dir),
                                                        "seconds": seconds}, client=self.client, lane=self.lane)
        return Submitted(label, at, run_id)

    def busy(self) -> bool:
        """A flow subprocess is alive: the worker's slot is still taken."""
        self._check_alive()
        return bool(descendants(self.worker.process.pid))

    def _check_alive(self) -> None:
        if self.worker is None or self.worker.process is None or self.worker.process.poll() is not None:
            raise BenchError(f"{self.name} worker exited; see {self.logs / (self.name + '.log')}")

    async def wait_idle(self, timeout: float = 60) -> float:
        await wait_for(lambda: not self.busy(), timeout, f"{self.name} worker to be idle")
        return time.time()

    async def clear(self, record_dir: Path, timeout: float = 90) -> None:
        """Delete every queued run, let the running ones finish, wait until no flow process is left."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.states import Cancelled

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))),
                sort=FlowRunSort.ID_DESC, limit=200, offset=0,
            )
            for run in runs:
                if run.state_type == StateType.SCHEDULED:
                    # Cancel, not delete: a worker that is picking the run up at this moment then
                    # fails to move it to Pending and never starts it (a deleted run it did start
                    # makes the taskserver worker retry the lost run for minutes, holding a slot).
                    await self.client.set_flow_run_state(run.id, Cancelled(message="benchmark cleanup"))
            if not runs and not self.busy():
                return
            await asyncio.sleep(0.5)
        raise BenchError(f"{self.name}: runs still unfinished after {timeout:.0f}s of clearing")

    async def stages(self, samples: list[dict]) -> dict[str, float]:
        """Median seconds per phase of the idle runs, from the server's state history and the records."""
        phases: dict[str, list[float]] = {k: [] for k in (
            "submit -> Pending (poll, pick-up)", "Pending -> Running (process start, imports)",
            "Running -> body start", "body end -> Completed", "Completed -> slot free (process exit)")}
        for sample in samples:
            states = await self.client.read_flow_run_states(UUID(sample["run_id"]))
            first = {}
            for state in sorted(states, key=lambda s: s.timestamp):
                first.setdefault(state.type.value, state.timestamp.timestamp())
            if not {"PENDING", "RUNNING", "COMPLETED"} <= set(first):
                continue
            values = (first["PENDING"] - sample["submitted"], first["RUNNING"] - first["PENDING"],
                      sample["started"] - first["RUNNING"], first["COMPLETED"] - sample["ended"],
                      sample["idle"] - first["COMPLETED"])
            for key, value in zip(phases, values):
                phases[key].append(value)
        return {k: round(statistics.median(v), 3) for k, v in phases.items() if v}

    async def picked_up_at(self, run_ids: dict[str, UUID | None]) -> dict[str, float]:
        """When each run went Pending (a worker took it from its queue)."""
        found = {}
        for label, run_id in run_ids.items():
            if run_id is None:
                continue
            states = await self.client.read_flow_run_states(run_id)
            pending = [s.timestamp.timestamp() for s in states if s.type.value == "PENDING"]
            if pending:
                found[label] = min(pending)
        return found

    async def stop(self) -> None:
        if self.worker is not None:
            kill_tree(self.worker.process)
            self.worker.process = None
        if self.client is not None:
            await self.client.__aexit__(None, None, None)
            self.client = None


class WarmSystem(PrefectSystem):
    """The warm lane: its interpreters are always alive, so "busy" means a run is in flight."""

    pool = "warm"
    lane = "warm"

    def worker_env(self) -> dict[str, str]:
        return {"TASKSERVER_WARM_PRELOAD": "encoder,flows", "OMP_NUM_THREADS": "1"}

    def busy(self) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
        )
        from prefect.client.schemas.objects import StateType

        self._check_alive()
        with get_client(sync_client=True) as client:
            return client.count_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.PENDING, StateType.RUNNING]))),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self.pool])),
            ) > 0

    async def wait_ready(self, timeout: float = 300) -> None:
        """Both interpreters loaded (they load the model before their first run)."""
        log = self.logs / f"{self.name}.log"
        await wait_for(lambda: log.exists() and log.read_text(errors="replace").count(" ready in ") >= SLOTS,
                       timeout, f"{self.name}: {SLOTS} warm interpreters")

    async def encode_requests(self, texts: list[str], out_dir: Path) -> dict[str, Any]:
        """One `encode` flow run per text, all submitted at once (as many clients would)."""
        from prefect.exceptions import PrefectHTTPStatusError

        deployment = await self.client.read_deployment_by_name("encode/normal")

        async def one(i: int, text: str) -> UUID:
            # One client submitting in a loop. On SQLite a create can still lose the write lock to
            # the runs being processed ("database is locked" -> 503 after the client's own retries).
            for attempt in range(5):
                try:
                    run = await self.client.create_flow_run_from_deployment(
                        deployment.id, parameters={"texts": [text], "ids": [f"r{i}"], "use_cache": False,
                                                   "output": str(out_dir / f"r{i}.npz")})
                    return run.id
                except PrefectHTTPStatusError as exc:
                    if exc.response.status_code != 503 or attempt == 4:
                        raise
                    await asyncio.sleep(1 + attempt)
            raise AssertionError("unreachable")

        began = time.time()
        ids = [await one(i, t) for i, t in enumerate(texts)]
        submitted = time.time() - began
        await wait_for(lambda: len(list(out_dir.glob("r*.npz"))) >= len(texts), 60 + len(texts) * 2,
                       f"{self.name}: {len(texts)} encode runs", interval=0.5)
        elapsed = time.time() - began
        states: dict[str, int] = {}
        for start in range(0, len(ids), 200):
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids[start:start + 200])),
                limit=200, offset=0, sort=__import__("prefect.client.schemas.sorting", fromlist=["x"]).FlowRunSort.ID_DESC)
            for run in runs:
                states[run.state_type.value] = states.get(run.state_type.value, 0) + 1
        return {"requests": len(texts), "seconds": round(elapsed, 2), "submit_seconds": round(submitted, 2),
                "per_second": round(len(texts) / elapsed, 2), "final_states": states}


class RedisServer:
    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server not found: `apt-get install redis-server` (Debian) for the Celery peer")
        self.home.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.home), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.home / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start; see {self.home / 'redis.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        kill_tree(self.process, grace=5)
        self.process = None


class CelerySystem:
    name = "celery"
    slow_poll = False

    def __init__(self, home: Path, logs: Path):
        self.redis = RedisServer(home / "redis")
        self.logs = logs
        self.worker: subprocess.Popen | None = None
        self.app = None

    async def start(self) -> None:
        self.redis.start()
        os.environ["BENCH_REDIS_URL"] = self.redis.url
        import celery_peer

        self.app = celery_peer.app
        self.app.conf.broker_url = self.redis.url
        self.probe = celery_peer.probe
        env = dict(os.environ, BENCH_REDIS_URL=self.redis.url,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])))
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "-Q", ",".join(celery_peer.QUEUES),
             "-c", str(SLOTS), "-P", "prefork", "-O", "fair", "--prefetch-multiplier", "1",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
             "-n", f"bench-{os.getpid()}@127.0.0.1"],
            cwd=str(BENCH_DIR), env=env, stdout=open(self.logs / "celery.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def submit(self, label: str, priority: str, seconds: float, record_dir: Path) -> Submitted:
        at = time.time()
        self.probe.apply_async(args=(label, str(record_dir), seconds), queue=priority)
        return Submitted(label, at)

    def _check_alive(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            raise BenchError(f"celery worker exited; see {self.logs / 'celery.log'}")

    async def wait_idle(self, timeout: float = 60) -> float:
        # Records say the body ended; the ack (acks_late) follows within milliseconds.
        self._check_alive()
        await asyncio.sleep(0.05)
        return time.time()

    async def clear(self, record_dir: Path, timeout: float = 90) -> None:
        self.app.control.purge()
        await wait_for(lambda: set(read_starts(record_dir)) <= set(read_done(record_dir)), timeout,
                       "running Celery tasks to finish")
        self.app.control.purge()
        await asyncio.sleep(0.2)

    async def stages(self, samples: list[dict]) -> dict[str, float]:
        return {}

    async def wait_ready(self, timeout: float = 120) -> None:
        return None

    async def encode_requests(self, texts: list[str], out_dir: Path) -> dict[str, Any]:
        """One Celery task per text; each worker process loads the model once, on its first task."""
        import celery_peer

        began = time.time()
        for i, text in enumerate(texts):
            celery_peer.encode_one.apply_async(args=(f"r{i}", text, str(out_dir)), queue="normal")
        submitted = time.time() - began
        await wait_for(lambda: len(list(out_dir.glob("r*.npy"))) >= len(texts), 60 + len(texts) * 2,
                       "celery: encode tasks", interval=0.2)
        elapsed = time.time() - began
        return {"requests": len(texts), "seconds": round(elapsed, 2), "submit_seconds": round(submitted, 2),
                "per_second": round(len(texts) / elapsed, 2)}

    async def stop(self) -> None:
        kill_tree(self.worker, grace=10)
        self.worker = None
        self.redis.stop()


# -- scenarios ----------------------------------------------------------------------------------

def request_texts(count: int) -> list[str]:
    """Distinct short texts, like single search queries or ticket titles."""
    topics = ["invoice", "login", "refund", "shipping", "password", "upgrade", "cancel", "billing",
              "crash", "export"]
    verbs = ["fails after", "is slow during", "was charged twice for", "cannot find", "asks about"]
    return [f"Customer {i}: {verbs[i % len(verbs)]} {topics[(i // 5) % len(topics)]} (ticket {i})"
            for i in range(count)]


def bare_encode_seconds(texts: list[str]) -> dict[str, Any]:
    """The baseline: the same texts in one batched call of the library, model already loaded."""
    import torch

    from taskserver import encoding

    torch.set_num_threads(os.cpu_count() or 1)
    encoding.get_encoder()
    encoding.encode_texts(texts[:64], [str(i) for i in range(64)], cache=None)  # warm the kernels
    began = time.perf_counter()
    encoding.encode_texts(texts, [str(i) for i in range(len(texts))], cache=None)
    seconds = time.perf_counter() - began
    return {"requests": len(texts), "seconds": round(seconds, 3), "per_second": round(len(texts) / seconds, 1)}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of a small sample."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def warm_up(system, records: Path) -> None:
    """One unmeasured run: the worker is polling and the imports are in the page cache."""
    await system.submit("warmup", "normal", 0.0, records)
    await wait_for(lambda: "warmup" in read_done(records), 120, f"{system.name} warm-up run", interval=0.2)
    await system.wait_idle()


async def idle_latency(system, count: int, records: Path) -> dict[str, Any]:
    samples = []
    for i in range(count):
        await system.wait_idle()
        label = f"idle{i}"
        sub = await system.submit(label, "normal", 0.0, records)
        await wait_for(lambda: label in read_done(records), 90, f"{system.name} idle run {label}")
        idle = await system.wait_idle()
        done = read_done(records)[label]
        samples.append({"run_id": str(sub.run_id) if sub.run_id else None, "submitted": sub.at,
                        "started": done["started"], "ended": done["ended"], "idle": idle})
    latencies = [s["started"] - s["submitted"] for s in samples]
    return {
        "samples": len(latencies),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "latencies_s": [round(x, 4) for x in latencies],
        "stages_median_s": await system.stages(samples),
    }


async def backlog(system, scale: Scale, records: Path) -> dict[str, Any]:
    lower = [f"low{i}" for i in range(scale.lows)] + [f"normal{i}" for i in range(scale.normals)]
    lower_subs = {}
    for label in lower:
        lower_subs[label] = await system.submit(label, label.rstrip("0123456789"), scale.lower_seconds, records)
    await wait_for(lambda: len(read_starts(records)) >= SLOTS, 120, f"{system.name}: lower runs filling both slots")
    criticals = [f"critical{i}" for i in range(scale.criticals)]
    first_submit = None
    for label in criticals:
        sub = await system.submit(label, "critical", scale.critical_seconds, records)
        first_submit = first_submit or sub.at
    # Taken once every critical exists: the lower runs whose body has not started are waiting beside
    # them. On Prefect, a run already picked up (Pending) is no longer waiting in its queue, so the
    # lower runs that went Pending before the first critical was submitted are left out afterwards.
    waiting = [label for label in lower if label not in read_starts(records)]
    timeout = 60 + 15 * scale.criticals + (30 if system.slow_poll else 0)
    await wait_for(lambda: set(criticals) <= set(read_starts(records)), timeout,
                   f"{system.name}: every critical run to start", interval=0.1)
    if hasattr(system, "picked_up_at"):
        picked = await system.picked_up_at({label: lower_subs[label].run_id for label in waiting})
        waiting = [label for label in waiting if picked.get(label, float("inf")) > first_submit]
    starts = first_starts(records)
    ends = sorted(r["ended"] for r in read_done(records).values() if r["ended"] >= first_submit)
    first_waiting_start = min((starts[x] for x in waiting if x in starts), default=float("inf"))
    critical_starts = sorted(starts[c] for c in criticals)
    waits, unmatched = [], 0
    for i, started in enumerate(critical_starts):
        if i < len(ends) and ends[i] <= started:
            waits.append(started - ends[i])
        else:
            unmatched += 1  # started without a slot having freed: the slots were not saturated
    adhered = sum(1 for s in critical_starts if s < first_waiting_start)
    overtaken_by = sorted(x for x in waiting if x in starts and starts[x] < max(critical_starts))
    return {
        "criticals": len(criticals),
        "waiting_lower_runs": len(waiting),
        "adhered": adhered,
        "adherence": adhered / len(criticals),
        "lower_runs_started_before_a_critical": overtaken_by,
        "critical_wait_p50_s": percentile(waits, 50),
        "critical_wait_max_s": max(waits) if waits else None,
        "critical_waits_s": [round(w, 4) for w in waits],
        "critical_submit_to_start_s": [round(s - first_submit, 4) for s in critical_starts],
        "unmatched": unmatched,
    }


async def noop_throughput(system, count: int, cap_s: float, records: Path) -> dict[str, Any]:
    first = None
    for i in range(count):
        sub = await system.submit(f"noop{i}", "normal", 0.0, records)
        first = first or sub.at
    deadline = first + cap_s
    try:
        await wait_for(lambda: len(read_done(records)) >= count or time.time() > deadline, cap_s + 60,
                       f"{system.name} no-op burst", interval=0.1)
    except BenchError:
        pass
    done = [r for r in read_done(records).values() if r["ended"] <= deadline]
    if not done:
        return {"submitted": count, "completed": 0, "runs_per_minute": 0.0, "window_s": cap_s}
    window = max(r["ended"] for r in done) - first
    return {"submitted": count, "completed": len(done), "window_s": round(window, 2),
            "runs_per_minute": len(done) / window * 60, "capped": len(done) < count}


async def bench_system(system, scale: Scale, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"title": TITLES[system.name]}
    dirs = {k: work / system.name / k for k in ("warmup", "idle", "backlog", "noop")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        await system.start()
        if hasattr(system, "wait_ready"):
            await system.wait_ready()
        await warm_up(system, dirs["warmup"])
        runs = scale.idle_runs_slow_poll if system.slow_poll else scale.idle_runs
        print(f"  [{system.name}] idle latency ({runs} runs)", flush=True)
        result["idle"] = await idle_latency(system, runs, dirs["idle"])
        print(f"  [{system.name}] backlog", flush=True)
        result["backlog"] = await backlog(system, scale, dirs["backlog"])
        await system.clear(dirs["backlog"])
        cap = scale.noop_cap_slow_poll_s if system.slow_poll else scale.noop_cap_s
        print(f"  [{system.name}] no-op burst ({scale.noop_runs} runs, {cap:.0f}s cap)", flush=True)
        result["noop"] = await noop_throughput(system, scale.noop_runs, cap, dirs["noop"])
        await system.clear(dirs["noop"])
        if system.name in ENCODE_SYSTEMS and scale.encode_requests:
            out = work / system.name / "encode"
            out.mkdir(parents=True, exist_ok=True)
            print(f"  [{system.name}] {scale.encode_requests} single-text encode requests", flush=True)
            result["encode"] = await system.encode_requests(request_texts(scale.encode_requests), out)
    except Exception as exc:  # one system failing must not lose the others' figures
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  [{system.name}] FAILED: {result['error']}", flush=True)
    finally:
        await system.stop()
    result["duplicate_body_starts"] = sorted(set().union(*(duplicate_starts(d) for d in dirs.values())))
    result["wall_s"] = round(time.monotonic() - began, 1)
    return result


# -- report -------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("submit → body start, idle, p50 (s)", lambda r: _fmt(r.get("idle", {}).get("p50_s"))),
        ("submit → body start, idle, p95 (s)", lambda r: _fmt(r.get("idle", {}).get("p95_s"))),
        ("critical wait after a lower run ends, p50 (s)",
         lambda r: _fmt(r.get("backlog", {}).get("critical_wait_p50_s"))),
        ("critical wait after a lower run ends, max (s)",
         lambda r: _fmt(r.get("backlog", {}).get("critical_wait_max_s"))),
        ("priority adherence (criticals before every waiting lower run)",
         lambda r: f"{r['backlog']['adhered']}/{r['backlog']['criticals']}" if "backlog" in r else "-"),
        ("no-op runs per minute (2 slots)", lambda r: _fmt(r.get("noop", {}).get("runs_per_minute"), 1)),
        ("single-text encode requests per second",
         lambda r: _fmt(r.get("encode", {}).get("per_second"), 1)),
        ("... as a share of the bare library's batched throughput",
         lambda r: f"{r['encode']['ratio_to_bare']:.1%}" if "ratio_to_bare" in r.get("encode", {}) else "-"),
        ("samples: idle / criticals / no-op completed",
         lambda r: "/".join(str(x) for x in (r.get("idle", {}).get("samples", "-"),
                                             r.get("backlog", {}).get("criticals", "-"),
                                             r.get("noop", {}).get("completed", "-")))),
    ]
    lines = ["| metric | " + " | ".join(results[n]["title"] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for title, cell in rows:
        lines.append(f"| {title} | " + " | ".join(cell(results[n]) for n in names) + " |")
    errors = [f"{results[n]['title']}: {results[n]['error']}" for n in names if "error" in results[n]]
    stages = {n: results[n].get("idle", {}).get("stages_median_s") for n in names}
    stages = {n: s for n, s in stages.items() if s}
    if stages:
        keys = list(next(iter(stages.values())))
        lines += ["", "Where an idle Prefect run's time goes (medians, s):", "",
                  "| phase | " + " | ".join(results[n]["title"] for n in stages) + " |",
                  "|---|" + "---|" * len(stages)]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(_fmt(s.get(key)) for s in stages.values()) + " |")
    if errors:
        lines += [""] + [f"ERROR {e}" for e in errors]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("prefect", "celery", "kombu", "redis"):
        try:
            found[package if package != "redis" else "redis-py"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    exe = shutil.which("redis-server")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        found["redis-server"] = next((w.removeprefix("v=") for w in out.split() if w.startswith("v=")), out.strip())
    return found


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    scale = QUICK if args.quick else FULL
    from dataclasses import replace

    if args.encode_requests is not None:
        scale = replace(scale, encode_requests=args.encode_requests)
    if args.idle_samples is not None:
        scale = replace(scale, idle_runs=args.idle_samples)
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    work = Path(tempfile.mkdtemp(prefix="taskserver-bench-queue-"))
    logs = work / "logs"
    logs.mkdir()
    # A throwaway stack: nothing here may touch a real TASKSERVER_HOME or ~/.prefect.
    os.environ.update({"TASKSERVER_HOME": str(work / "taskserver"), "PREFECT_HOME": str(work / "prefect-client"),
                       "TASKSERVER_CODE_DIR": str(REPO)})
    load_before = os.getloadavg()
    began = time.monotonic()
    results: dict[str, dict] = {}
    server_logs: dict[str, dict[str, int]] = {}
    databases = [d.strip() for d in args.database.split(",") if d.strip()]
    if sorted(set(databases) - set(DATABASES)):
        raise SystemExit(f"--database: choose from {', '.join(DATABASES)}")
    try:
        for database in databases if any(s != "celery" for s in chosen) else []:
            results.update(await bench_on_database(database, [s for s in chosen if s != "celery"], scale,
                                                   work / database, logs, server_logs))
        if "celery" in chosen:
            print(f"benchmarking {TITLES['celery']}", flush=True)
            results["celery"] = await bench_system(CelerySystem(work, logs), scale, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if any(name in ENCODE_SYSTEMS for name in chosen) and scale.encode_requests:
        print("bare library baseline: the same texts in one batched call", flush=True)
        bare = bare_encode_seconds(request_texts(scale.encode_requests))
        for key, result in results.items():
            if "encode" in result:
                encoded = result["encode"]
                encoded["ratio_to_bare"] = round(bare["seconds"] / encoded["seconds"], 4)
        results_bare = bare
    else:
        results_bare = None
    report = {
        "benchmark": "queue",
        "bare_encode": results_bare,
        "mode": "quick" if args.quick else "full",
        "scale": asdict(scale),
        "slots": SLOTS,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - began, 1),
        "versions": versions(),
        "celery_priority_mode": "one Redis list per level, -Q critical,high,normal,low,"
                                " queue_order_strategy=priority, prefetch multiplier 1, acks_late",
        "systems": results,
        "server_log_errors": server_logs,
        "work_dir": str(work) if args.keep else None,
    }
    report["table_markdown"] = markdown_table(results)
    for database, counts in server_logs.items():
        report["table_markdown"] += f"\n\nServer log on {database}: " + ", ".join(
            f"{count} × {name}" for name, count in counts.items())
    if results_bare:
        report["table_markdown"] += (
            f"\n\nBare library baseline: {results_bare['requests']} texts in one batched call:"
            f" {results_bare['seconds']:.2f} s ({results_bare['per_second']:.0f} texts/s).")
    return report


async def bench_on_database(database: str, chosen: list[str], scale: Scale, work: Path, logs: Path,
                            server_logs: dict[str, dict[str, int]]) -> dict[str, dict]:
    """Every Prefect system in ``chosen`` against one server on ``database``; keys name the database."""
    from taskserver.platform.local_postgres import LocalPostgres

    work.mkdir(parents=True, exist_ok=True)
    postgres = LocalPostgres(work / "postgres") if database == "postgres" else None
    url = postgres.url if postgres else f"sqlite+aiosqlite:///{work / 'prefect.db'}"
    results: dict[str, dict] = {}
    server = None
    try:
        if postgres:
            postgres.start()
        print(f"starting a Prefect server ({database}) and bootstrapping the platform with the probe", flush=True)
        server = PrefectServer(work / "prefect-server", url).start()
        os.environ["PREFECT_API_URL"] = server.api_url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from taskserver.platform.bootstrap import bootstrap_async  # after the URL: prefect reads it at import
        from taskserver.platform.tasks import DIAGNOSTIC_TASKS

        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            results.update(await _bench_prefect_systems(database, chosen, scale, server, work, logs,
                                                        bootstrap_async, DIAGNOSTIC_TASKS))
    finally:
        if server is not None:
            server.stop()
            text = (server.home / "server.log").read_text(errors="replace")
            server_logs[database] = {name: text.count(marker) for name, marker in SERVER_ERROR_MARKERS.items()}
        if postgres:
            postgres.stop()
    return results


async def _bench_prefect_systems(database, chosen, scale, server, work, logs, bootstrap_async, extra_tasks):
    await bootstrap_async(extra_tasks=extra_tasks)
    from taskserver.platform.wakeup import FALLBACK_POLL_SECONDS

    results: dict[str, dict] = {}
    for name in chosen:
        print(f"benchmarking {TITLES[name]} on {database}", flush=True)
        if name == "taskserver-warm":  # as `taskserver up` runs it: woken by run events, slow fallback poll
            system = WarmSystem(name, server, "warm", FALLBACK_POLL_SECONDS, logs)
        else:
            poll = 10 if name == "prefect-10s" else 1
            worker_type = "taskserver" if name.startswith("taskserver") else "process"
            system = PrefectSystem(name, server, worker_type, poll, logs)
        result = await bench_system(system, scale, work)
        result["title"] = f"{result['title']} [{database}]"
        results[f"{name}[{database}]"] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (about 5 minutes on 2 cores)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON results go")
    parser.add_argument("--idle-samples", type=int, default=None,
                        help="idle submit -> body start samples for the fast-polling systems (default 8 quick, 16 full)")
    parser.add_argument("--database", default="postgres",
                        help=f"comma-separated subset of {DATABASES}: the Prefect server's database(s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs, records)")
    parser.add_argument("--encode-requests", type=int, default=None,
                        help="single-text encode requests (default: 200 quick, 1000 full; 0 skips)")
    args = parser.parse_args(argv)

    def _interrupted(signum, _frame):  # run the finally blocks that stop every process
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupted)
    report = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(f"queue benchmark ({report['mode']}, {report['wall_s']:.0f}s, load average before"
          f" {report['load_average_before']}, after {report['load_average_after']}, {report['cpus']} CPUs)")
    print(json.dumps(report["versions"]))
    print(report["table_markdown"])
    print(f"\nwritten to {args.out}")
    return 1 if any("error" in r for r in report["systems"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
