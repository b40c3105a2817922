"""Each drained batch as a Prefect flow run, with one task run per request (named by its id and priority).

Recorded after the results are stored, on a thread of its own, so a request never waits for
Prefect. Task runs inside a running flow reach the server as client-side events, so a batch of 64
requests costs one flow run's API writes, not 64. A Prefect server that is down loses records
(logged), never results.
"""

from __future__ import annotations

import logging
import os
import queue as stdlib_queue
import threading
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from taskserver.settings import Settings

log = logging.getLogger("taskserver.request_lane.records")

FLOW_NAME = "request-batch"
PENDING_LIMIT = 1000
"""Batches waiting to be recorded; past this, records are dropped (and logged) rather than memory grown."""


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    task: str
    priority: str
    requests: list[dict[str, Any]]
    """``{"request_id", "priority", "attempt", "error"}`` per request, in batch order."""
    started: float
    finished: float

    @classmethod
    def of(cls, batch_id: uuid.UUID, batch: Sequence[Any], outcomes: Sequence[Any], started: float,
           finished: float, written: Collection[uuid.UUID]) -> "BatchRecord":
        rows = [{"request_id": str(record.id), "priority": record.priority, "attempt": record.attempts,
                 "error": (outcome.error or {}).get("message") if outcome.error else None}
                for record, outcome in zip(batch, outcomes) if record.id in written]
        return cls(str(batch_id), batch[0].task, batch[0].priority, rows, started, finished)


class PrefectRecorder:
    """A background thread that runs the ``request-batch`` flow once per recorded batch."""

    def __init__(self) -> None:
        self._pending: stdlib_queue.Queue[BatchRecord | None] = stdlib_queue.Queue(PENDING_LIMIT)
        self._thread = threading.Thread(target=self._serve, name="prefect-records", daemon=True)
        self._thread.start()

    @classmethod
    def if_configured(cls, settings: Settings) -> "PrefectRecorder | None":
        if not settings.request_prefect_records or not os.environ.get("PREFECT_API_URL"):
            return None
        return cls()

    def record(self, batch: BatchRecord) -> None:
        try:
            self._pending.put_nowait(batch)
        except stdlib_queue.Full:
            log.warning("batch %s not recorded in Prefect: %d batches already waiting", batch.batch_id, PENDING_LIMIT)

    def close(self, timeout: float = 30) -> None:
        """Record what is waiting, then stop."""
        self._pending.put(None)
        self._thread.join(timeout)

    def _serve(self) -> None:
        from taskserver.flows.heartbeats import without_engine_heartbeats

        flow = request_batch_flow()
        while (batch := self._pending.get()) is not None:
            try:
                with without_engine_heartbeats():
                    flow(batch.task, batch.priority, batch.batch_id, batch.requests, batch.started, batch.finished)
            except Exception as exc:  # noqa: BLE001 - a record lost, never a result
                log.warning("batch %s not recorded in Prefect: %s", batch.batch_id, exc)


def request_batch_flow():
    """The flow a batch is recorded as (built on first use: importing Prefect is slow)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(name="request", task_run_name="request-{request_id}-{priority}", cache_policy=NO_CACHE,
          persist_result=False)
    def request(request_id: str, priority: str, attempt: int, error: str | None) -> str:
        if error:
            raise RuntimeError(error)
        return request_id

    @flow(name=FLOW_NAME, flow_run_name="{task}-{priority}-{batch_id}", persist_result=False,
          validate_parameters=False)
    def request_batch(task: str, priority: str, batch_id: str, requests: list[dict[str, Any]],
                      started: float, finished: float) -> dict[str, int]:
        """One drained batch of the request lane: one task run per request, Failed where it failed."""
        states = [request(**row, return_state=True) for row in requests]
        return {"requests": len(states), "failed": sum(1 for s in states if s.is_failed())}

    return request_batch
