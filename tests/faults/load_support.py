"""Helpers for the load test: bulk run creation, state and pick-up reads, RSS sampling, log scanning.

Everything reads the real server (or /proc); nothing here stands in for Prefect.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import psutil

CONCURRENT_REQUESTS = 8
"""API calls in flight at once while creating or reading runs: fast, without flooding 2 cores."""

DATABASE_ERROR = re.compile(
    r"database is locked|deadlock|OperationalError|asyncpg\.exceptions|sqlalchemy\.exc|QueuePool limit"
    r"|too many (clients|connections)|could not serialize|InterfaceError|connection was closed",
    re.IGNORECASE,
)
"""The database-class failures a server under load can log (SQLite's lock, Postgres' deadlocks and
pool exhaustion): on Postgres there must be none."""

ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
LOG_RECORD_START = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \|")

RETRIED_TRIGGER_RACE = ("Failed in consume_loop", "Could not refresh instance '<AutomationBucket")
"""A race inside Prefect 3.8.8's trigger evaluation, not a database failure: ``read_bucket_by_trigger_id``
(``prefect/server/events/triggers.py``) selects a zombie-automation bucket and then refreshes it,
and the proactive evaluator may delete that bucket in between; SQLAlchemy raises
``InvalidRequestError``. The in-memory consumer (``messaging/memory.py``, ``_consume_loop``) logs
it and puts the event back on its retry queue (up to 3 retries), so the evaluation runs again.
An evaluation is lost only if the event reaches the dead-letter queue, which Prefect logs as
LOST_EVALUATION below; the load test allows the race and fails on that."""
LOST_EVALUATION = "will be moved to the dead letter queue"


async def _create(items: list[tuple[str, dict]]) -> list[tuple[str, float]]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        names = sorted({name for name, _ in items})
        deployments = {name: (await client.read_deployment_by_name(name)).id for name in names}
        gate = asyncio.Semaphore(CONCURRENT_REQUESTS)

        async def one(name: str, parameters: dict) -> tuple[str, float]:
            async with gate:
                flow_run = await client.create_flow_run_from_deployment(deployments[name], parameters=parameters)
                return str(flow_run.id), time.time()

        return list(await asyncio.gather(*(one(name, parameters) for name, parameters in items)))


def create_runs(items: list[tuple[str, dict]]) -> list[tuple[str, float]]:
    """(flow run id, creation time) per (deployment, parameters), in the order given."""
    return asyncio.run(_create(items))


async def _states(ids: list[str]) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    found: dict[str, object] = {}
    async with get_client() as client:
        for start in range(0, len(ids), 200):
            chunk = [UUID(i) for i in ids[start:start + 200]]
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)),
                sort=FlowRunSort.ID_DESC, limit=len(chunk), offset=0,
            )
            found.update({str(r.id): r for r in runs})
    return found


def read_flow_runs(ids: list[str]) -> dict[str, object]:
    """The server's flow runs by id (200 per request, the API's page limit)."""
    return asyncio.run(_states(ids))


async def _histories(ids: list[str]) -> dict[str, list[tuple[str, float]]]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        gate = asyncio.Semaphore(CONCURRENT_REQUESTS)

        async def one(flow_run_id: str) -> tuple[str, list[tuple[str, float]]]:
            async with gate:
                states = await client.read_flow_run_states(UUID(flow_run_id))
            return flow_run_id, sorted((s.type.value, s.timestamp.timestamp()) for s in states)

        return dict(await asyncio.gather(*(one(i) for i in ids)))


def state_histories(ids: list[str]) -> dict[str, list[tuple[str, float]]]:
    """Every state each run went through, as (type, timestamp)."""
    return asyncio.run(_histories(ids))


def vm_rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (0 once it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss / 1024 / 1024
    except psutil.NoSuchProcess:
        return 0.0


def tree_rss_mb(pid: int) -> float:
    """VmRSS summed over a process and all its descendants (the server may run uvicorn in a child)."""
    try:
        pids = [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    return sum(vm_rss_mb(p) for p in pids)


@dataclass
class RssSampler:
    """Samples a process tree's RSS every ``interval`` seconds on a thread, until stopped."""

    pid: int
    interval: float = 1.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(time.time(), MB)"""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), tree_rss_mb(self.pid)))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.samples

    def peak_between(self, start: float, end: float) -> float:
        return max((mb for t, mb in self.samples if start <= t <= end), default=0.0)


def log_records(log: Path) -> list[list[str]]:
    """The log's records: a timestamped line and its continuation lines (a traceback)."""
    if not log.exists():
        return []
    records: list[list[str]] = []
    for line in log.read_text(errors="replace").splitlines():
        if LOG_RECORD_START.match(line) or not records:
            records.append([line.rstrip()])
        else:
            records[-1].append(line.rstrip())
    return records


def is_retried_trigger_race(record: list[str]) -> bool:
    return RETRIED_TRIGGER_RACE[0] in record[0] and any(RETRIED_TRIGGER_RACE[1] in line for line in record)


def _lines(log: Path, keep_races: bool = False) -> list[str]:
    return [line for record in log_records(log) if keep_races or not is_retried_trigger_race(record)
            for line in record]


def retried_trigger_races(log: Path) -> int:
    return sum(1 for record in log_records(log) if is_retried_trigger_race(record))


def error_lines(log: Path) -> list[str]:
    """ERROR/CRITICAL lines and traceback headers of a log file (Prefect's retried trigger race aside)."""
    return [line for line in _lines(log) if ERROR_LINE.search(line)]


def database_errors(log: Path) -> list[str]:
    """Every line naming a database-class failure, whatever its level (the retried trigger race aside)."""
    return [line for line in _lines(log) if DATABASE_ERROR.search(line)]


def lost_evaluations(log: Path) -> list[str]:
    """Events Prefect's consumers gave up on (dead-lettered): an evaluation that never happened."""
    return [line for line in _lines(log, keep_races=True) if LOST_EVALUATION in line]
