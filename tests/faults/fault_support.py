"""Helpers for the fault tests: kill a worker like a lost node, run the recovery service, read run histories.

Built on tests/integration/platform_support.py (servers, workers, probe records); nothing here mocks
Prefect: every state read comes from the real server.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from uuid import UUID

import psutil

from platform_support import RecoveryService, WorkerProcess, _stop, base_env, wait_until  # noqa: F401 - re-exported


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_like_a_lost_node(worker: WorkerProcess) -> list[int]:
    """SIGKILL the worker and every process below it, as losing its node or pod would.

    The worker runs in its own session (start_new_session), but Prefect starts each flow-run
    process in a session of its own too, so killing the group alone would leave the runs alive:
    the worker is frozen first (so it starts nothing new), then its whole tree is killed.
    """
    assert worker.process is not None, "the worker is not running"
    pid = worker.process.pid
    os.kill(pid, signal.SIGSTOP)
    tree = descendants(pid)
    killed = [pid] + [p.pid for p in tree]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    worker.process.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    worker.process = None
    return killed


# -- run states ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    """A run as the server reports it, with its whole state history (oldest first)."""

    id: UUID
    state_type: str
    state_name: str
    message: str
    run_count: int
    history: list[tuple[str, str, str]]
    """(type, name, message) per state."""
    infrastructure_pid: str | None

    def count(self, state_type: str) -> int:
        return sum(1 for kind, _, _ in self.history if kind == state_type)

    def messages(self, state_type: str) -> list[str]:
        return [message for kind, _, message in self.history if kind == state_type]


async def _read_runs(ids: list[UUID], api_url: str | None = None) -> dict[UUID, RunRecord]:
    from prefect.client.orchestration import get_client

    out: dict[UUID, RunRecord] = {}
    async with get_client() as client:
        for run_id in ids:
            run = await client.read_flow_run(run_id)
            states = await client.read_flow_run_states(run_id)
            states.sort(key=lambda s: s.timestamp)
            out[run_id] = RunRecord(
                id=run_id,
                state_type=run.state_type.value if run.state_type else "",
                state_name=run.state_name or "",
                message=(run.state.message if run.state else "") or "",
                run_count=run.run_count,
                history=[(s.type.value, s.name or "", s.message or "") for s in states],
                infrastructure_pid=run.infrastructure_pid,
            )
    return out


def read_runs(ids: list[UUID]) -> dict[UUID, RunRecord]:
    return asyncio.run(_read_runs(list(ids)))


def state_types(ids: list[UUID]) -> dict[UUID, str]:
    async def read() -> dict[UUID, str]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids))),
                sort=FlowRunSort.ID_DESC, limit=len(ids), offset=0,
            )
            return {run.id: run.state_type.value if run.state_type else "" for run in runs}

    return asyncio.run(read())


def all_in(ids: list[UUID], wanted: set[str]) -> bool:
    types = state_types(ids)
    return len(types) == len(ids) and all(kind in wanted for kind in types.values())


def job_lane_deployment(flow: str, priority: str, pool: str) -> str:
    """The deployment of ``flow`` at ``priority`` that runs on ``pool`` (a one-process-per-run
    pool): ``<flow>/<priority>`` or ``<flow>/<priority>-job``, whichever the catalogue made."""

    async def find() -> str:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            for name in (f"{priority}", f"{priority}-job"):
                try:
                    deployment = await client.read_deployment_by_name(f"{flow}/{name}")
                except ObjectNotFound:
                    continue
                if deployment.work_pool_name == pool:
                    return f"{flow}/{name}"
        raise AssertionError(f"no deployment of {flow!r} at priority {priority!r} on pool {pool!r}")

    return asyncio.run(find())


def create_runs(deployment: str, parameters: list[dict]) -> list[UUID]:
    """One run per parameter set, created straight from the deployment (validated by the server)."""

    async def create() -> list[UUID]:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            found = await client.read_deployment_by_name(deployment)
            return [(await client.create_flow_run_from_deployment(found.id, parameters=p)).id
                    for p in parameters]

    return asyncio.run(create())


def flow_run_process(run_id: UUID, worker: WorkerProcess) -> psutil.Process:
    """The process executing ``run_id``'s flow under ``worker``: the deepest process carrying the
    run's id (the engine, below any supervisor Prefect puts between it and the worker)."""
    assert worker.process is not None
    found: list[psutil.Process] = []
    for process in descendants(worker.process.pid):
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == str(run_id):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    engines = [p for p in found if "prefect.engine" in " ".join(_cmdline(p))]
    chosen = engines or found
    if not chosen:
        raise AssertionError(f"no process of flow run {run_id} under worker {worker.process.pid}")
    return chosen[-1]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    """platform_support.wait_until, polling once a second by default."""
    return wait_until(predicate, timeout, what, interval)


def heartbeats_received(ids: list[UUID]) -> set[UUID]:
    """The runs among ``ids`` whose ``prefect.flow-run.heartbeat`` the server has stored: from then
    on the zombie automation watches them, so a kill is sure to be noticed."""

    async def read() -> set[UUID]:
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        wanted = EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                             resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}" for run_id in ids]))
        async with get_client() as client:
            response = await client._client.post(
                "/events/filter", json={"filter": wanted.model_dump(mode="json"), "limit": 50}  # the API's most
            )
            response.raise_for_status()
            return {UUID(event["resource"]["prefect.resource.id"].rsplit(".", 1)[1])
                    for event in response.json()["events"]}

    return asyncio.run(read())


def wait_for_heartbeats(ids: list[UUID], timeout: float = 60) -> None:
    """Until the server has a heartbeat of every run in ``ids``."""
    wait_for(lambda: heartbeats_received(ids) >= set(ids), timeout, f"a heartbeat of each of {len(ids)} runs",
             interval=0.5)
