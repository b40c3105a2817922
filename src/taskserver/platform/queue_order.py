"""The queue priorities a worker orders its picked-up runs by, read from its pool's queues.

Shared by the job lane's process worker, the warm lane's worker and the bootstrap (which writes
the queues this reads).
"""

from __future__ import annotations

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import WorkQueueFilter
from prefect.client.schemas.objects import FlowRun, WorkQueue

from taskserver.platform.priorities import PRIORITIES

UNKNOWN_QUEUE_PRIORITY = len(PRIORITIES) + 1
"""A run from a queue outside the model (e.g. ``default``) comes after every level."""


async def read_queues(client: PrefectClient, pool_name: str) -> list[WorkQueue]:
    """All queues of a pool. Explicit paging arguments: newer FastAPI rejects the client's nulls."""
    return await client.read_work_queues(
        work_pool_name=pool_name, work_queue_filter=WorkQueueFilter(), limit=200, offset=0
    )


class QueuePriorityMixin:
    """For a Prefect worker: ``_priority_of(run)``, refreshed once per poll."""

    _queue_priorities: dict[str, int]

    async def _refresh_queue_priorities(self) -> None:
        try:
            queues = await read_queues(self.client, self._work_pool_name)  # type: ignore[attr-defined]
        except Exception:  # keep the last known map; the poll itself reports API trouble
            return
        self._queue_priorities = {queue.name: queue.priority for queue in queues}

    def _priority_of(self, flow_run: FlowRun) -> int:
        known = getattr(self, "_queue_priorities", {})
        return known.get(flow_run.work_queue_name or "", UNKNOWN_QUEUE_PRIORITY)
