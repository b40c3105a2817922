"""Workers that poll the moment a run of their pool changes state, instead of polling fast.

A worker finds work by polling (``PREFECT_WORKER_QUERY_SECONDS``). Fast polls make runs start
quickly but cost the server CPU all the time, run or no run: the warm lane's 0.25 s polls were
most of the idle stack's CPU. This mixin subscribes to the server's event stream
(``/events/out``, the same websocket the UI uses) and polls at once when a flow run of this
worker's pool changes state: a new Scheduled run, or a run that ended and freed a slot. The
timed poll stays as the fallback (a dropped stream, a missed event), so it can be slow.

Bursts coalesce: events that arrive while a poll is under way cause one more poll, not one each.
Polls never overlap, so a run cannot be submitted twice by two concurrent polls. A poll also
starts only once the server has answered the Pending proposal of every run the last one took: Prefect
proposes Pending in background tasks, and the server counts a work queue's concurrency from
runs that are Pending or Running, so a poll that followed at once saw a queue limited to one run
still free and took a second run from it (a CI failure, 2026-12-07).
"""

from __future__ import annotations

from typing import Any

import anyio

from taskserver.settings import get_settings

WAKE_EVENT_PREFIX = "prefect.flow-run."
IGNORED_EVENTS = ("prefect.flow-run.heartbeat",)
"""Heartbeats say a run is alive, not that anything changed for the queue."""
FALLBACK_POLL_SECONDS = 15.0
"""The timed poll of a worker that wakes on run events (the local stack's and the chart's).

Each poll also makes the server mark the pool's queues and deployments ready: with three workers
on a 5 s poll that was about half of an idle server's CPU (py-spy, 2026-12-01). What only the
timed poll finds is a run that falls due with no state change (a deployment's schedule), which
Prefect's 10 s prefetch takes on the poll before: such a run starts at most 5 s late."""
PENDING_ANSWER_TIMEOUT_SECONDS = 30.0
"""How long a poll waits for the Pending answers of the runs the last one took before it goes
ahead anyway (the API may be down; a run whose deployment was just deleted is never proposed)."""
RECONNECT_DELAY_SECONDS = (1.0, 30.0)
"""Back-off bounds when the event stream cannot be reached (the timed poll keeps working)."""


def concerns_pool(event: Any, pool_name: str) -> bool:
    """Whether ``event`` is a state change of a flow run in the work pool named ``pool_name``."""
    if not event.event.startswith(WAKE_EVENT_PREFIX) or event.event in IGNORED_EVENTS:
        return False
    for related in event.related:
        if related.get("prefect.resource.role") == "work-pool" and related.get("prefect.resource.name") == pool_name:
            return True
    return False


class WakeOnRunEvents:
    """Mixin for a ``BaseWorker`` subclass (listed before it). A worker's ``run`` calls ``wake()``
    as it returns: the base class frees the slot right after, before anything else runs."""

    _work_pool_name: str
    _logger: Any
    _exit_stack: Any

    async def setup(self) -> None:
        await super().setup()  # type: ignore[misc]
        if not get_settings().wake_on_run_events:
            return
        group = anyio.create_task_group()
        await self._exit_stack.enter_async_context(group)
        self._exit_stack.callback(group.cancel_scope.cancel)
        group.start_soon(self.run_wakeups)

    def _wakeup_state(self) -> tuple[anyio.Event, anyio.Lock]:
        if not hasattr(self, "_wake_event"):
            self._wake_event = anyio.Event()
            self._poll_lock = anyio.Lock()
        return self._wake_event, self._poll_lock

    def _pending_answer(self, flow_run_id: Any) -> anyio.Event:
        if not hasattr(self, "_pending_answers"):
            self._pending_answers: dict[Any, anyio.Event] = {}
        return self._pending_answers.setdefault(flow_run_id, anyio.Event())

    async def _await_pending_answers(self) -> None:
        """Wait until the server has answered the Pending proposal of each run the last poll took."""
        taken = list(getattr(self, "_pending_answers", {}))
        with anyio.move_on_after(PENDING_ANSWER_TIMEOUT_SECONDS):
            for flow_run_id in taken:
                if flow_run_id in getattr(self, "_submitting_flow_run_ids", ()):  # else: given up on
                    await self._pending_answer(flow_run_id).wait()
        for flow_run_id in taken:
            self._pending_answers.pop(flow_run_id, None)

    async def get_and_submit_flow_runs(self) -> list[Any]:
        _, lock = self._wakeup_state()
        async with lock:  # the timed poll and a wake-up never fetch the same runs twice,
            await self._await_pending_answers()  # ... nor a queue's slot before the server counts it
            runs: list[Any] = await super().get_and_submit_flow_runs()  # type: ignore[misc]
            # Nothing awaited since the base class scheduled the submissions: subclasses that
            # register the runs as this returns still do so before any submission starts.
            for flow_run in runs:
                self._pending_answer(flow_run.id)
            return runs

    async def _propose_pending_state(self, flow_run: Any) -> bool:
        try:
            return bool(await super()._propose_pending_state(flow_run))  # type: ignore[misc]
        finally:
            self._pending_answer(flow_run.id).set()

    def _has_free_slot(self) -> bool:
        limiter = getattr(self, "_limiter", None)  # BaseWorker's CapacityLimiter, None without a limit
        return limiter is None or limiter.available_tokens >= 1

    def wake(self) -> None:
        self._wakeup_state()[0].set()

    async def run_wakeups(self) -> None:
        """Listen for this pool's run events and poll on each burst; runs until cancelled."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._listen_for_run_events)
            while True:
                event, _ = self._wakeup_state()
                await event.wait()
                self._wake_event = anyio.Event()  # events from now on ask for the next poll
                if not self._has_free_slot():
                    continue  # every slot busy: the run that frees one wakes us as it returns
                try:
                    await self.get_and_submit_flow_runs()
                except Exception as exc:  # noqa: BLE001 - the timed poll reports API trouble
                    self._logger.debug(f"wake-up poll failed: {exc}")

    async def _listen_for_run_events(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        delay = RECONNECT_DELAY_SECONDS[0]
        while True:
            try:
                subscriber = get_events_subscriber(
                    filter=EventFilter(event=EventNameFilter(prefix=[WAKE_EVENT_PREFIX],
                                                             exclude_name=list(IGNORED_EVENTS))),
                    reconnect_on_clean_close=True,
                )
                async with subscriber:
                    self._logger.debug(f"listening for run events of pool {self._work_pool_name!r}")
                    async for event in subscriber:
                        delay = RECONNECT_DELAY_SECONDS[0]
                        if concerns_pool(event, self._work_pool_name):
                            self.wake()
            except Exception as exc:  # noqa: BLE001 - server restarting, stream refused: retry later
                self._logger.debug(f"run event stream unavailable ({exc}); retrying in {delay:.0f}s")
            await anyio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_SECONDS[1])
