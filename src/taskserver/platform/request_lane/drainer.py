"""``python -m taskserver.platform.request_lane.drainer``: takes queued requests in priority order and runs them in batches.

It wakes on NOTIFY (a one-second poll is only the fallback for a notification lost while the
database was away). It runs one batch at a time, plus one more only for requests more urgent than
every running batch, so a critical request never waits behind a slow low one; batches are also
bounded in texts. The model runs in a thread while the event loop renews the batch's lease, and a
lost database is waited out: results are kept and written when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Optional

import asyncpg
import typer
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

from taskserver import commands
from taskserver.errors import TaskserverError
from taskserver.platform.request_lane import DRAINER_MODULE, queue
from taskserver.platform.request_lane.batches import error_record, run_batch, use_threads, warm_up
from taskserver.platform.request_lane.catalogue import PreparedRequest, prepare
from taskserver.platform.request_lane.client import database_url
from taskserver.platform.request_lane.records import BatchRecord, PrefectRecorder
from taskserver.settings import Settings, get_settings

log = logging.getLogger("taskserver.request_lane.drainer")

SLOTS = 2
"""Batches at once: one, and a second only for work more urgent than the first."""
FALLBACK_POLL_SECONDS = 1.0
RECONNECT_SECONDS = 1.0
CLEANUP_EVERY_SECONDS = 600.0
_DATABASE_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, ConnectionError)


class Drainer:
    def __init__(self, url: str, name: str | None = None, settings: Settings | None = None,
                 recorder: PrefectRecorder | None = None) -> None:
        self.url = url
        self.name = name or f"drainer-{socket.gethostname()}-{os.getpid()}"
        self.settings = settings or get_settings()
        self.recorder = recorder
        self.running: dict[uuid.UUID, int] = {}
        """Batches holding the model (a slot each): batch id → the batch's rank."""
        self.tasks: set[asyncio.Task] = set()
        """Every batch not done yet, its results' write included: waited for at stop."""
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.pool: asyncpg.Pool | None = None
        self.listener: asyncpg.Connection | None = None
        self._next_reap = 0.0
        self._next_cleanup = 0.0

    async def run(self) -> None:
        """Serve until ``stop()``; then let running batches finish and write their results."""
        while not self.stopping.is_set():
            try:
                await self._connect()
                await self._cycle()
            except _DATABASE_ERRORS as exc:
                log.warning("database unavailable (%s: %s); retrying in %.0fs", type(exc).__name__, exc,
                            RECONNECT_SECONDS)
                await self._close_listener()
                await asyncio.sleep(RECONNECT_SECONDS)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._close_listener()
        if self.pool is not None:
            await self.pool.close()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def _connect(self) -> None:
        if self.pool is None:
            self.pool = await queue.create_pool(self.url, max_size=SLOTS + 2)
            async with self.pool.acquire() as conn:
                await queue.ensure_schema(conn)
        if self.listener is None or self.listener.is_closed():
            self.listener = await queue.connect(self.url)
            await self.listener.add_listener(queue.NEW_CHANNEL, lambda *_: self.wake.set())
            self.wake.set()  # anything queued while we were away

    async def _close_listener(self) -> None:
        if self.listener is not None:
            try:
                await asyncio.wait_for(self.listener.close(), 2)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - it is gone either way
                self.listener.terminate()
            self.listener = None

    async def _cycle(self) -> None:
        """One pass: housekeeping, fill free slots, then sleep until woken."""
        await self._housekeeping()
        started = await self._fill_slots()
        if started or self.stopping.is_set():
            return
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), FALLBACK_POLL_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        assert self.pool is not None
        if now >= self._next_reap:
            self._next_reap = now + max(0.2, self.settings.request_lease_seconds / 4)
            async with self.pool.acquire() as conn:
                requeued, failed = await queue.requeue_expired(conn)
            if requeued or failed:
                log.warning("leases ran out: %d requests requeued, %d failed (attempts spent)", requeued, failed)
        if now >= self._next_cleanup:
            self._next_cleanup = now + CLEANUP_EVERY_SECONDS
            async with self.pool.acquire() as conn:
                deleted = await queue.cleanup(conn, self.settings.request_retention_hours)
            if deleted:
                log.info("retention: deleted %d finished requests", deleted)

    async def _fill_slots(self) -> int:
        started = 0
        while len(self.running) < SLOTS and not self.stopping.is_set():
            below = min(self.running.values(), default=queue.NO_RANK_LIMIT)
            batch = await self._claim(below)
            if not batch:
                break
            batch_id = batch[0].batch_id
            task = asyncio.create_task(self._process(batch))
            self.running[batch_id] = batch[0].rank
            self.tasks.add(task)
            task.add_done_callback(lambda done, key=batch_id: self._finished(key, done))
            started += 1
        return started

    def _release(self, batch_id: uuid.UUID) -> None:
        """The batch's slot is free (its model call is over): wake the loop to claim the next."""
        if self.running.pop(batch_id, None) is not None:
            self.wake.set()

    def _finished(self, batch_id: uuid.UUID, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._release(batch_id)

    async def _claim(self, below_rank: int) -> list[queue.RequestRecord]:
        s = self.settings
        batch_id = uuid.uuid4()
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            batch = await queue.claim(conn, self.name, batch_id, s.request_lease_seconds, s.request_batch_size,
                                      s.request_batch_max_texts, below_rank=below_rank)
            room = s.request_batch_size - len(batch)
            texts = sum(record.size for record in batch)
            if batch and room > 0 and texts < s.request_batch_max_texts and s.request_batch_window_ms > 0:
                await asyncio.sleep(s.request_batch_window_ms / 1000)  # let concurrent submissions land
                batch += await queue.claim(conn, self.name, batch_id, s.request_lease_seconds, room,
                                           s.request_batch_max_texts - texts, batch_key=batch[0].batch_key,
                                           rank=batch[0].rank, first_position=len(batch))
        return batch

    async def _process(self, batch: Sequence[queue.RequestRecord]) -> None:
        batch_id = batch[0].batch_id
        started = time.time()
        renewer = asyncio.create_task(self._renew(batch_id))
        try:
            outcomes = await asyncio.to_thread(drain_batch, batch)
        finally:
            renewer.cancel()
            # The next batch's claim and model call overlap this one's write. complete() writes
            # only rows this batch still holds, so a lease that runs out meanwhile cannot duplicate.
            self._release(batch_id)
        finished = time.time()
        written = await self._write(batch_id, outcomes)
        log.info("batch %s: %s %s x%d, %.3fs, %d written", batch_id, batch[0].task, batch[0].priority,
                 len(batch), finished - started, len(written))
        if self.recorder is not None and written:
            self.recorder.record(BatchRecord.of(batch_id, batch, outcomes, started, finished, set(written)))

    async def _renew(self, batch_id: uuid.UUID) -> None:
        every = self.settings.request_lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                assert self.pool is not None
                async with self.pool.acquire() as conn:
                    await queue.renew(conn, batch_id, self.settings.request_lease_seconds)
            except _DATABASE_ERRORS as exc:
                log.warning("batch %s: lease not renewed (%s); retrying", batch_id, exc)

    async def _write(self, batch_id: uuid.UUID, outcomes: list[queue.Outcome]) -> list[uuid.UUID]:
        """Store the batch's outcomes, waiting out a database outage (the write is idempotent)."""

        def report(state: RetryCallState) -> None:
            log.warning("batch %s: results not written yet (%s); retrying", batch_id,
                        state.outcome.exception() if state.outcome else "?")

        retrying = AsyncRetrying(retry=retry_if_exception_type(_DATABASE_ERRORS),
                                 wait=wait_fixed(RECONNECT_SECONDS), before_sleep=report, reraise=True)
        return await retrying(self._complete, batch_id, outcomes)

    async def _complete(self, batch_id: uuid.UUID, outcomes: list[queue.Outcome]) -> list[uuid.UUID]:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            return await queue.complete(conn, batch_id, outcomes)


def drain_batch(batch: Sequence[queue.RequestRecord]) -> list[queue.Outcome]:
    """Check each request again, run the good ones per batch key in one call each, keep each outcome."""
    outcomes: dict[uuid.UUID, queue.Outcome] = {}
    groups: dict[tuple[str, str], list[tuple[uuid.UUID, PreparedRequest]]] = {}
    for record in batch:
        try:
            prepared = prepare(record.task, record.params, record.priority)
        except TaskserverError as exc:
            outcomes[record.id] = queue.Outcome(record.id, error=error_record(exc))
            continue
        groups.setdefault((prepared.task, prepared.batch_key), []).append((record.id, prepared))
    for members in groups.values():
        results = run_batch([prepared for _, prepared in members])
        for (request_id, _), (result, error) in zip(members, results):
            outcomes[request_id] = queue.Outcome(request_id, result=result, error=error)
    return [outcomes[record.id] for record in batch]


def drain(
    name: Annotated[Optional[str], typer.Option(help="This drainer's name in the rows it claims.")] = None,  # noqa: UP007
) -> None:
    """Take the request lane's queue in priority order, in batches, until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    threads = use_threads(settings.request_threads)
    warm_up()
    recorder = PrefectRecorder.if_configured(settings)
    drainer = Drainer(database_url(settings), name, settings, recorder)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, drainer.stop)
        log.info("%s: draining %s (batches of up to %d requests / %d texts, window %.0f ms, %d threads)",
                 drainer.name, queue.TABLE, settings.request_batch_size, settings.request_batch_max_texts,
                 settings.request_batch_window_ms, threads)
        await drainer.run()

    asyncio.run(serve())
    if recorder is not None:
        recorder.close()


def main(argv: list[str] | None = None) -> None:
    commands.run(drain, argv, prog=f"python -m {DRAINER_MODULE}")


if __name__ == "__main__":
    main()
