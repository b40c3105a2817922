"""Submitting requests from Python: ``submit(task, params, priority=...)`` gives a handle whose ``.result(timeout)`` waits.

``submit`` returns once the request row is committed. Waiting listens for the drainer's NOTIFY
(with a slow poll behind it, for a notification lost while the database restarted). A failed
request raises its own error, rebuilt as the ``taskserver.errors`` class the drainer recorded.

    from taskserver.platform.request_lane.client import submit
    vector = submit("encode", {"texts": ["a text"]}, priority="high").result(timeout=30)["embeddings"][0]
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine, TypeVar

import asyncpg

from taskserver import errors
from taskserver.errors import RequestLaneError, RequestTimeoutError, TaskserverError
from taskserver.platform.local_postgres import HOME_DATA_DIR, LocalPostgres
from taskserver.platform.priorities import DEFAULT_PRIORITY
from taskserver.platform.request_lane import queue
from taskserver.platform.request_lane.batches import error_record
from taskserver.platform.request_lane.catalogue import prepare
from taskserver.settings import Settings, get_settings

POLL_SECONDS = 1.0
"""Behind NOTIFY: how often a waiter re-reads its requests anyway."""
T = TypeVar("T")


def database_url(settings: Settings | None = None) -> str:
    """The request lane's PostgreSQL: the setting, else the local stack's embedded server."""
    settings = settings or get_settings()
    url = settings.request_database_url.get_secret_value()
    if url:
        return url
    return LocalPostgres(Path(settings.home).expanduser().resolve() / HOME_DATA_DIR).url


def raise_for(record: queue.RequestRecord) -> Any:
    """The record's result, or its error raised as the ``taskserver.errors`` class it names."""
    if record.state == queue.COMPLETED:
        return record.result
    error = record.error or {}
    cls = getattr(errors, str(error.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, TaskserverError)) or cls is errors.BatchFailedError:
        cls = RequestLaneError
    raise cls(error.get("input", f"request {record.id}"), error.get("reason", "failed"), error.get("hint"))


def item(task: str, params: Any, priority: str = DEFAULT_PRIORITY) -> queue.NewRequest:
    """One request to queue, or (bad input) one stored as failed at once with its own error."""
    try:
        prepared = prepare(task, params, priority)
    except TaskserverError as exc:
        name = priority if isinstance(priority, str) else "?"
        return queue.NewRequest(str(task), name, queue.NO_RANK_LIMIT, "invalid", params if _jsonable(params)
                                else None, error=error_record(exc))
    return queue.NewRequest(prepared.task, prepared.priority, prepared.rank, prepared.batch_key,
                            prepared.params.model_dump(), prepared.size)


def _jsonable(value: Any) -> bool:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class AsyncRequestClient:
    """Submits to and waits on the request lane from asyncio code; one per event loop."""

    def __init__(self, url: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.url = url or database_url(self.settings)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._done = asyncio.Event()
        self._inboxes: list[tuple[set[str], set[uuid.UUID]]] = []
        """Each running wait's ids (as text) and the ones NOTIFY has named finished since its last read."""

    async def __aenter__(self) -> "AsyncRequestClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connection_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            try:
                self._pool = await queue.create_pool(self.url)
                async with self._pool.acquire() as conn:
                    await queue.ensure_schema(conn)
            except (OSError, asyncpg.PostgresError) as exc:
                self._pool = None
                raise RequestLaneError("the request lane's database", f"cannot be reached ({exc})",
                                       "start the stack with `taskserver up`, or set TASKSERVER_REQUEST_DATABASE_URL")
        return self._pool

    async def submit(self, task: str, params: Any, priority: str = DEFAULT_PRIORITY) -> uuid.UUID:
        """Queue one request; bad input raises its error at once and queues nothing."""
        prepared = prepare(task, params, priority)
        new = queue.NewRequest(prepared.task, prepared.priority, prepared.rank, prepared.batch_key,
                               prepared.params.model_dump(), prepared.size)
        return (await self.submit_items([new]))[0]

    async def submit_many(self, requests: Iterable[tuple[str, Any] | tuple[str, Any, str]]) -> list[uuid.UUID]:
        """Queue many in one transaction; a bad one is stored failed with its own error, the rest go on."""
        return await self.submit_items([item(*request) for request in requests])

    async def submit_items(self, items: Sequence[queue.NewRequest]) -> list[uuid.UUID]:
        pool = await self.connection_pool()
        async with pool.acquire() as conn:
            return await queue.enqueue(conn, items, self.settings.request_max_attempts)

    async def records(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, queue.RequestRecord]:
        pool = await self.connection_pool()
        async with pool.acquire() as conn:
            return await queue.fetch(conn, ids)

    async def wait(self, ids: Sequence[uuid.UUID], timeout: float | None = None) -> dict[uuid.UUID, queue.RequestRecord]:
        """Every request's finished record; ``RequestTimeoutError`` if some are still open after ``timeout``."""
        await self._listen()
        deadline = None if timeout is None else time.monotonic() + timeout
        pending, finished = set(ids), {}
        inbox: set[uuid.UUID] = set()
        entry = ({str(i) for i in ids}, inbox)
        self._inboxes.append(entry)
        try:
            last_full = -POLL_SECONDS
            while True:
                notified = self._done  # set (and replaced) by the next NOTIFY, whoever else is waiting
                # Every pending id at first and once per POLL_SECONDS (a NOTIFY lost while the
                # listener reconnects is caught up); in between only the ids NOTIFY named finished.
                now = time.monotonic()
                full = self._listener is None or now - last_full >= POLL_SECONDS
                last_full = now if full else last_full
                wanted = pending if full else inbox & pending
                inbox.clear()
                found = await self.records(list(wanted)) if wanted else {}
                finished.update({key: record for key, record in found.items() if record.finished})
                pending -= finished.keys()
                missing = (pending & wanted) - found.keys()
                if missing:
                    raise RequestLaneError(f"request {sorted(missing)[0]}", "is not in the queue",
                                           "it was never submitted, or was deleted after the retention period")
                if not pending:
                    return finished
                left = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - time.monotonic())
                if left <= 0:
                    raise RequestTimeoutError(f"{len(pending)} of {len(ids)} requests",
                                              f"not finished after {timeout}s", "wait longer; they stay queued or running")
                try:
                    await asyncio.wait_for(notified.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._inboxes.remove(entry)

    async def result(self, request_id: uuid.UUID, timeout: float | None = None) -> Any:
        return raise_for((await self.wait([request_id], timeout))[request_id])

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await queue.connect(self.url)
            await self._listener.add_listener(queue.DONE_CHANNEL, lambda _c, _p, _ch, payload: self._notified(payload))
        except (OSError, asyncpg.PostgresError):
            self._listener = None  # the poll still finds the results

    def _notified(self, payload: str = "") -> None:
        """The DONE payload names the finished requests: each wait reads only its own of them next."""
        named = set(payload.split(",")) if payload else set()
        for ids, inbox in self._inboxes:
            inbox.update(uuid.UUID(i) for i in named & ids)
        done, self._done = self._done, asyncio.Event()
        done.set()

    async def close(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()
        self._listener = self._pool = None


@dataclass(frozen=True)
class RequestHandle:
    """A submitted request; ``result(timeout)`` waits for it and returns its result or raises its error."""

    id: uuid.UUID
    client: "RequestClient"

    def result(self, timeout: float | None = None) -> Any:
        return self.client.result(self.id, timeout)


class RequestClient:
    """The blocking client: an ``AsyncRequestClient`` on a private event-loop thread."""

    def __init__(self, url: str | None = None, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="request-lane-client", daemon=True)
        self._thread.start()
        self._client = self._call(_make_async(url, settings))

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def submit(self, task: str, params: Any, priority: str = DEFAULT_PRIORITY) -> RequestHandle:
        return RequestHandle(self._call(self._client.submit(task, params, priority)), self)

    def submit_many(self, requests: Iterable[tuple[str, Any] | tuple[str, Any, str]]) -> list[RequestHandle]:
        return [RequestHandle(i, self) for i in self._call(self._client.submit_many(list(requests)))]

    def submit_items(self, items: Sequence[queue.NewRequest]) -> list[uuid.UUID]:
        """Queue rows as given (already checked, or stored failed with their ``error``)."""
        return self._call(self._client.submit_items(items))

    def result(self, request_id: uuid.UUID, timeout: float | None = None) -> Any:
        return self._call(self._client.result(request_id, timeout))

    def wait(self, ids: Sequence[uuid.UUID], timeout: float | None = None) -> dict[uuid.UUID, queue.RequestRecord]:
        return self._call(self._client.wait(ids, timeout))

    def records(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, queue.RequestRecord]:
        return self._call(self._client.records(ids))

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "RequestClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make_async(url: str | None, settings: Settings | None) -> AsyncRequestClient:
    return AsyncRequestClient(url, settings)


_default: list[RequestClient] = []


def submit(task: str, params: Any, priority: str = DEFAULT_PRIORITY) -> RequestHandle:
    """Queue one request on the configured lane (one shared client per process)."""
    return _shared().submit(task, params, priority)


def submit_many(requests: Iterable[tuple[str, Any] | tuple[str, Any, str]]) -> list[RequestHandle]:
    """Queue many requests in one transaction: ``[(task, params), (task, params, priority), ...]``."""
    return _shared().submit_many(requests)


async def submit_async(task: str, params: Any, priority: str = DEFAULT_PRIORITY,
                       timeout: float | None = None) -> Any:
    """Submit one request and await its result, in the caller's event loop."""
    async with AsyncRequestClient() as client:
        return await client.result(await client.submit(task, params, priority), timeout)


def cleanup_now(settings: Settings | None = None) -> int:
    """Delete finished requests past the retention period at once; returns how many."""
    settings = settings or get_settings()

    async def run() -> int:
        async with AsyncRequestClient(settings=settings) as client:
            pool = await client.connection_pool()
            async with pool.acquire() as conn:
                return await queue.cleanup(conn, settings.request_retention_hours)

    return asyncio.run(run())


def _shared() -> RequestClient:
    if not _default:
        _default.append(RequestClient())
    return _default[0]
