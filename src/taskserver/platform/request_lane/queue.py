"""The request lane's durable queue: one table in its own schema, ``SELECT … FOR UPDATE SKIP LOCKED`` and NOTIFY.

A request row is committed before its submitter hears back. A drainer claims the head of the queue
(lowest priority number, then oldest) together with queued requests of the same batch key and
priority, and holds them under a lease it renews; a lease that runs out (a drainer killed) puts the
requests back, until their attempts are spent. Results and errors are written into the same row,
only by the claim that holds it, so a request completes once. Finished rows are deleted after the
retention period.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

SCHEMA = "taskserver_requests"
TABLE = f"{SCHEMA}.requests"
NEW_CHANNEL = "taskserver_requests_new"
"""NOTIFY'd when requests are queued (or re-queued): wakes the drainers."""
DONE_CHANNEL = "taskserver_requests_done"
"""NOTIFY'd with the finished requests' ids (comma-separated): wakes the waiting submitters."""
QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
FINISHED = (COMPLETED, FAILED)
NO_RANK_LIMIT = 32767
_SCHEMA_LOCK = 0x7461736B  # pg_advisory_xact_lock key: concurrent first starts create the schema once
_NOTIFY_IDS_PER_MESSAGE = 150  # NOTIFY payloads stop at 8000 bytes

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {TABLE} (
    id uuid PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    task text NOT NULL,
    priority text NOT NULL,
    rank smallint NOT NULL,
    batch_key text NOT NULL,
    size integer NOT NULL DEFAULT 1,
    params jsonb NOT NULL,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'completed', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    lease_until timestamptz,
    drainer text,
    batch_id uuid,
    batch_position integer,
    result jsonb,
    error jsonb,
    submitted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS requests_queued ON {TABLE} (rank, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS requests_queued_by_key ON {TABLE} (batch_key, rank, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS requests_leases ON {TABLE} (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS requests_finished ON {TABLE} (finished_at) WHERE state IN ('completed', 'failed');
"""

_COLUMNS = ("id, seq, task, priority, rank, batch_key, size, params, state, attempts, max_attempts, batch_id,"
            " batch_position, result, error, submitted_at, started_at, finished_at, drainer")
_RETURNED = ", ".join(f"r.{name.strip()}" for name in _COLUMNS.split(","))


@dataclass(frozen=True)
class NewRequest:
    """A row to queue. ``error`` set: the request is stored already failed (bad input), never drained."""

    task: str
    priority: str
    rank: int
    batch_key: str
    params: Any
    size: int = 1
    error: dict[str, Any] | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True)
class RequestRecord:
    id: uuid.UUID
    seq: int
    task: str
    priority: str
    rank: int
    batch_key: str
    size: int
    params: Any
    state: str
    attempts: int
    max_attempts: int
    batch_id: uuid.UUID | None
    batch_position: int | None
    result: Any
    error: dict[str, Any] | None
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    drainer: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass(frozen=True)
class Outcome:
    """What one request of a batch came to: a result or an error (``taskserver.errors`` fields)."""

    id: uuid.UUID
    result: Any = None
    error: dict[str, Any] | None = None


def asyncpg_dsn(url: str) -> str:
    """A libpq URL for asyncpg from a SQLAlchemy one (``postgresql+asyncpg://`` → ``postgresql://``)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    await _init_connection(conn)
    return conn


async def create_pool(url: str, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(asyncpg_dsn(url), min_size=1, max_size=max_size, init=_init_connection)


async def ensure_schema(conn: asyncpg.Connection) -> None:
    """Create the schema, table and indexes if missing; safe from many processes at once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute(DDL)


def _record(row: asyncpg.Record) -> RequestRecord:
    return RequestRecord(**dict(row))


async def enqueue(conn: asyncpg.Connection, requests: Sequence[NewRequest], max_attempts: int) -> list[uuid.UUID]:
    """Store every request in one transaction (committed before this returns), then wake the drainers."""
    if not requests:
        return []
    async with conn.transaction():
        await conn.execute(
            f"INSERT INTO {TABLE} (id, task, priority, rank, batch_key, size, params, state, error, finished_at,"
            " max_attempts)"
            " SELECT u.id, u.task, u.priority, u.rank, u.batch_key, u.size, u.params::jsonb,"
            "  CASE WHEN u.error IS NULL THEN 'queued' ELSE 'failed' END, u.error::jsonb,"
            "  CASE WHEN u.error IS NULL THEN NULL ELSE clock_timestamp() END, $8"
            " FROM unnest($1::uuid[], $2::text[], $3::text[], $4::smallint[], $5::text[], $6::int[], $7::text[],"
            "  $9::text[]) AS u(id, task, priority, rank, batch_key, size, params, error)",
            [r.id for r in requests], [r.task for r in requests], [r.priority for r in requests],
            [r.rank for r in requests], [r.batch_key for r in requests], [r.size for r in requests],
            [json.dumps(r.params) for r in requests], max_attempts,
            [None if r.error is None else json.dumps(r.error) for r in requests],
        )
        if any(r.error is None for r in requests):
            await conn.execute("SELECT pg_notify($1, '')", NEW_CHANNEL)
        await _notify_done(conn, [r.id for r in requests if r.error is not None])
    return [r.id for r in requests]


async def claim(
    conn: asyncpg.Connection, drainer: str, batch_id: uuid.UUID, lease_seconds: float, max_requests: int,
    max_texts: int, below_rank: int = NO_RANK_LIMIT, batch_key: str | None = None, rank: int | None = None,
    first_position: int = 0,
) -> list[RequestRecord]:
    """Claim the head of the queue and compatible requests behind it, as one batch; [] if none is queued.

    The batch is the head's batch key at the head's priority, oldest first, up to ``max_requests``
    requests and ``max_texts`` texts (the head always fits). ``below_rank`` only considers more urgent
    work; ``batch_key``, ``rank`` and ``first_position`` top up a batch already claimed.
    """
    async with conn.transaction():
        if batch_key is None:
            head = await conn.fetchrow(
                f"SELECT batch_key, rank FROM {TABLE} WHERE state = 'queued' AND rank < $1"
                " ORDER BY rank, seq LIMIT 1 FOR UPDATE SKIP LOCKED", below_rank)
            if head is None:
                return []
            batch_key, rank = head["batch_key"], head["rank"]
        candidates = await conn.fetch(
            f"SELECT id, size FROM {TABLE} WHERE state = 'queued' AND batch_key = $1 AND rank = $2"
            " ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED", batch_key, rank, max_requests)
        chosen = take_within(candidates, max_texts)
        if not chosen:
            return []
        rows = await conn.fetch(
            f"UPDATE {TABLE} r SET state = 'running', attempts = attempts + 1, drainer = $2,"
            " lease_until = clock_timestamp() + make_interval(secs => $3), started_at = clock_timestamp(),"
            " batch_id = $4, batch_position = u.position - 1 + $5"
            " FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, position)"
            f" WHERE r.id = u.id RETURNING {_RETURNED}", chosen, drainer, lease_seconds, batch_id, first_position)
    return sorted((_record(row) for row in rows), key=lambda record: record.seq)


def take_within(candidates: Sequence[Any], max_texts: int) -> list[uuid.UUID]:
    """The leading candidates whose texts fit ``max_texts`` (always the first, whatever its size)."""
    chosen: list[uuid.UUID] = []
    total = 0
    for row in candidates:
        if chosen and total + row["size"] > max_texts:
            break
        chosen.append(row["id"])
        total += row["size"]
    return chosen


async def renew(conn: asyncpg.Connection, batch_id: uuid.UUID, lease_seconds: float) -> int:
    """Extend the lease of a batch still being worked on; returns how many rows it still holds."""
    status = await conn.execute(
        f"UPDATE {TABLE} SET lease_until = clock_timestamp() + make_interval(secs => $2)"
        " WHERE batch_id = $1 AND state = 'running'", batch_id, lease_seconds)
    return int(status.split()[-1])


async def complete(conn: asyncpg.Connection, batch_id: uuid.UUID, outcomes: Sequence[Outcome]) -> list[uuid.UUID]:
    """Write each request's result or error, only where this batch still holds it; wake the waiters."""
    async with conn.transaction():
        rows = await conn.fetch(
            f"UPDATE {TABLE} r SET state = CASE WHEN u.error IS NULL THEN 'completed' ELSE 'failed' END,"
            " result = u.result::jsonb, error = u.error::jsonb, finished_at = clock_timestamp(), lease_until = NULL"
            " FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, result, error)"
            " WHERE r.id = u.id AND r.state = 'running' AND r.batch_id = $4 RETURNING r.id",
            [o.id for o in outcomes],
            [None if o.error is not None else json.dumps(o.result) for o in outcomes],
            [None if o.error is None else json.dumps(o.error) for o in outcomes], batch_id)
        done = [row["id"] for row in rows]
        await _notify_done(conn, done)
    return done


async def requeue_expired(conn: asyncpg.Connection) -> tuple[int, int]:
    """Put back requests whose lease ran out; fail those with no attempts left. Returns (requeued, failed)."""
    async with conn.transaction():
        rows = await conn.fetch(
            f"WITH lost AS (SELECT id FROM {TABLE} WHERE state = 'running' AND lease_until < clock_timestamp()"
            "  FOR UPDATE SKIP LOCKED)"
            f" UPDATE {TABLE} r SET"
            "  state = CASE WHEN r.attempts >= r.max_attempts THEN 'failed' ELSE 'queued' END,"
            "  error = CASE WHEN r.attempts >= r.max_attempts THEN jsonb_build_object("
            "   'type', 'RequestLostError', 'input', 'request ' || r.id::text,"
            "   'reason', 'its drainer was lost ' || r.attempts || ' times (attempts: ' || r.max_attempts || ')',"
            "   'hint', 'see the drainer''s log; the request may crash the model') END,"
            "  finished_at = CASE WHEN r.attempts >= r.max_attempts THEN clock_timestamp() END,"
            "  lease_until = NULL, batch_id = NULL, batch_position = NULL, drainer = NULL"
            " FROM lost WHERE r.id = lost.id RETURNING r.id, r.state")
        requeued = [row["id"] for row in rows if row["state"] == QUEUED]
        failed = [row["id"] for row in rows if row["state"] == FAILED]
        if requeued:
            await conn.execute("SELECT pg_notify($1, '')", NEW_CHANNEL)
        await _notify_done(conn, failed)
    return len(requeued), len(failed)


async def cleanup(conn: asyncpg.Connection, retention_hours: float) -> int:
    """Delete finished requests older than the retention period; returns how many."""
    status = await conn.execute(
        f"DELETE FROM {TABLE} WHERE state IN ('completed', 'failed')"
        " AND finished_at < clock_timestamp() - make_interval(secs => $1)", retention_hours * 3600.0)
    return int(status.split()[-1])


async def fetch(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RequestRecord]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ANY($1::uuid[])", list(ids))
    return {row["id"]: _record(row) for row in rows}


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Requests per state (what a dashboard or an autoscaler reads)."""
    rows = await conn.fetch(f"SELECT state, count(*) AS n FROM {TABLE} GROUP BY state")
    return {row["state"]: int(row["n"]) for row in rows}


async def _notify_done(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> None:
    for start in range(0, len(ids), _NOTIFY_IDS_PER_MESSAGE):
        chunk = ids[start:start + _NOTIFY_IDS_PER_MESSAGE]
        await conn.execute("SELECT pg_notify($1, $2)", DONE_CHANNEL, ",".join(str(i) for i in chunk))
