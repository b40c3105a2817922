"""A process worker that starts flow runs in priority order, not only picks them up in it.

Prefect's server hands a worker scheduled runs sorted by queue priority, and a worker with a
``limit`` takes only as many as it has free slots. But the runs taken in one poll are then
launched concurrently, so a ``normal`` run picked up beside a ``critical`` one can reach its
flow body first. This worker closes that gap: a run does not launch its process while a run
of a strictly higher priority that this worker picked up earlier has not yet reached Running.
Runs of the same priority launch together, so the gate costs nothing without mixed batches.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Annotated, Any, Optional
from uuid import UUID

import anyio
import typer
from prefect.exceptions import ObjectNotFound
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Scheduled
from prefect.workers.base import BaseWorker
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult
from tenacity import AsyncRetrying, retry_if_not_exception_type, wait_fixed

from taskserver import commands
from taskserver.platform import job_engine
from taskserver.platform.queue_order import QueuePriorityMixin
from taskserver.platform.tasks import CONTAINER_WORKER_TYPE, PROCESS_WORKER_TYPE, WARM_POOL
from taskserver.platform.wakeup import WakeOnRunEvents

START_GATE_POLL_SECONDS = 0.2
START_GATE_TIMEOUT_SECONDS = 120.0
"""A higher-priority run that has not started by then no longer holds lower runs back."""

MAX_REQUEUES = 3
REQUEUE_API_WAIT_SECONDS = 300.0

_NOT_STARTED = (StateType.SCHEDULED, StateType.PENDING)


class PriorityProcessJobConfiguration(ProcessJobConfiguration):
    """Runs each flow run through ``taskserver.platform.job_engine`` unless the deployment or pool
    names a command of its own: Prefect's engine without its ~1 s-per-run heartbeat thread."""

    def prepare_for_flow_run(self, *args: Any, **kwargs: Any) -> None:
        if self.command is None:
            self.command = job_engine.COMMAND
        super().prepare_for_flow_run(*args, **kwargs)


class PriorityProcessWorker(WakeOnRunEvents, QueuePriorityMixin, ProcessWorker):
    """Process worker whose flow bodies start in queue-priority order."""

    type = PROCESS_WORKER_TYPE
    job_configuration = PriorityProcessJobConfiguration
    _display_name = "Taskserver process"
    _description = (
        "Runs flow runs as subprocesses, starting each only after every higher-priority run it"
        " picked up has started."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_start: dict[UUID, int] = {}
        self._queue_priorities: dict[str, int] = {}
        self._requeues: dict[UUID, int] = {}

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        await self._refresh_queue_priorities()
        runs = await super().get_and_submit_flow_runs()
        # The base class only schedules the submissions; none has run yet, because nothing
        # awaited since. Registering here therefore happens before any run reaches `run()`.
        for run in runs:
            self._awaiting_start.setdefault(run.id, self._priority_of(run))
        return runs

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        try:
            try:
                await self._wait_for_higher_priority_starts(flow_run)
                result = await super().run(flow_run, configuration, task_status)
            finally:
                self._awaiting_start.pop(flow_run.id, None)
            if result.status_code != 0 and await self._requeue_if_never_started(flow_run):
                # Handled: the run is Scheduled again, so the base class must not mark it Crashed.
                return ProcessWorkerResult(status_code=0, identifier=result.identifier)
            return result
        finally:
            self.wake()  # this slot frees as run() returns: look for the next run at once

    async def _requeue_if_never_started(self, flow_run: FlowRun) -> bool:
        """A process that died before its run left Pending (typically: the API was down while
        it started) would leave the run Pending forever. Put it back in its queue instead; its
        body never ran, so this cannot run it twice. Waits up to ``REQUEUE_API_WAIT_SECONDS``
        for the API to answer."""
        count = self._requeues.get(flow_run.id, 0)
        if count >= MAX_REQUEUES:
            return False
        retrying = AsyncRetrying(  # the API may still be coming back; a deleted run needs nothing
            retry=retry_if_not_exception_type(ObjectNotFound), wait=wait_fixed(2), sleep=anyio.sleep, reraise=True,
        )
        with anyio.move_on_after(REQUEUE_API_WAIT_SECONDS):
            try:
                requeued = await retrying(self._requeue_if_pending, flow_run)
            except ObjectNotFound:
                return False
            if requeued:
                self._requeues[flow_run.id] = count + 1
                self.get_flow_run_logger(flow_run).warning("Process exited before the flow started; run requeued")
            return requeued
        return False

    async def _requeue_if_pending(self, flow_run: FlowRun) -> bool:
        current = await self.client.read_flow_run(flow_run.id)
        if current.state_type != StateType.PENDING:
            return False
        await self.client.set_flow_run_state(
            flow_run.id, Scheduled(message="Requeued: its process exited before the flow started"), force=True,
        )
        return True

    def _blockers(self, flow_run: FlowRun) -> list[UUID]:
        mine = self._awaiting_start.get(flow_run.id, self._priority_of(flow_run))
        return [rid for rid, prio in self._awaiting_start.items() if prio < mine and rid != flow_run.id]

    async def _wait_for_higher_priority_starts(self, flow_run: FlowRun) -> None:
        blockers = self._blockers(flow_run)
        if not blockers:
            return
        logger = self.get_flow_run_logger(flow_run)
        logger.info(f"Waiting for {len(blockers)} higher-priority run(s) to start first")
        with anyio.move_on_after(START_GATE_TIMEOUT_SECONDS) as scope:
            while blockers:
                runs = await self.client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=blockers)),
                    sort=FlowRunSort.ID_DESC,  # explicit: newer FastAPI rejects the client's nulls
                    limit=len(blockers),
                )
                for run in runs:
                    if run.state_type not in _NOT_STARTED:
                        self._awaiting_start.pop(run.id, None)
                for rid in set(blockers) - {run.id for run in runs}:
                    self._awaiting_start.pop(rid, None)  # deleted runs block nothing
                blockers = self._blockers(flow_run)
                if blockers:
                    await anyio.sleep(START_GATE_POLL_SECONDS)
        if scope.cancelled_caught:
            logger.warning(
                f"Higher-priority runs {blockers} did not start within"
                f" {START_GATE_TIMEOUT_SECONDS:.0f}s; starting anyway"
            )
            for rid in blockers:
                self._awaiting_start.pop(rid, None)


def serve_pool(
    pool: Annotated[str, typer.Argument(help="The work pool (it must exist: `taskserver bootstrap`).")],
    limit: Annotated[int, typer.Argument(min=1, help="Runs at once (the warm pool: its interpreters).")],
    name: Annotated[Optional[str], typer.Argument(help="The worker's name; default: Prefect's.")] = None,  # noqa: UP007
) -> None:
    """A pool's worker in the foreground: the warm pool gets the warm lane's worker, a container pool
    (``taskserver up --containers``) the container worker, any other pool the priority process
    worker. What ``taskserver up`` starts per pool."""
    worker_type: type[BaseWorker]
    if pool == WARM_POOL.name:
        from taskserver.platform.warm import WarmWorker as worker_type
    elif _pool_type(pool) == CONTAINER_WORKER_TYPE:
        from taskserver.platform.container_worker import ContainerWorker as worker_type
    else:
        worker_type = PriorityProcessWorker
    worker = worker_type(work_pool_name=pool, limit=limit, name=name, create_pool_if_not_found=False)
    anyio.run(worker.start)


def _pool_type(pool: str) -> str | None:
    """The pool's type on the API; None when it cannot be read (the worker then reports why)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_work_pool(pool).type
    except Exception:  # noqa: BLE001 - the worker's own start names the trouble
        return None


def main(argv: list[str] | None = None) -> None:
    """``POOL LIMIT [NAME]``: what ``python -m taskserver.platform.serve`` (the local stack) runs."""
    commands.run(serve_pool, argv, prog="python -m taskserver.platform.serve")


# The prefect.collections entry point imports this module; importing the warm lane here
# registers its worker type (`taskserver-warm`) too, and the container lane's
# (`taskserver-container`) where the `containers` extra is installed.
from taskserver.platform.warm import WarmWorker  # noqa: E402,F401

if find_spec("prefect_docker") is not None:
    from taskserver.platform.container_worker import ContainerWorker  # noqa: E402,F401
