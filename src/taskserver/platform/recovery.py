"""Reschedule flow runs that were lost with their infrastructure (a killed worker, node or pod).

Prefect's flow retries cover exceptions raised inside a flow; a run whose process vanished ends
Crashed (by the zombie automation, or by its own SIGTERM handler) and stays there. This service
puts such runs back in their queue, a bounded number of times, and leaves every other crash alone.
Run it as ``python -m taskserver.platform.recovery [--interval 15] [--max-attempts 3] [--once]
[--heartbeat-file PATH]``; with a heartbeat file, its mtime is the time of the last finished pass
(the chart's liveness probe restarts a loop that stopped passing).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Optional
from uuid import UUID

import typer

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import AwaitingRetry

from taskserver import commands
from taskserver.flows.heartbeats import HEARTBEAT_SECONDS
from taskserver.platform.tasks import ALL_POOLS

log = logging.getLogger("taskserver.recovery")

DEFAULT_MAX_ATTEMPTS = 3
"""Starts a run may get in all, the first included: 3 = the original and two reschedules."""
DEFAULT_LOOKBACK = timedelta(hours=24)
"""Runs that crashed longer ago than this are history, not work to recover."""
DEFAULT_INTERVAL_SECONDS = 15.0
PAGE_SIZE = 200

RESCHEDULE_MESSAGE_PREFIX = "Rescheduled by taskserver recovery"
"""Starts every state message this service writes: it is how past reschedules are counted."""

LOST_INFRASTRUCTURE_MESSAGES: tuple[str, ...] = (
    # The "crash zombie flows" automation (bootstrap.zombie_automation): no heartbeat for 90 s,
    # so the process, its worker or its node is gone.
    "Flow run marked as crashed due to missing heartbeats.",
    # The flow engine after SIGTERM: Kubernetes eviction or preemption, a node drain, a pod
    # deleted, `docker stop`, a worker shutting its runs down.
    "Execution was aborted by a termination signal.",
    # Workers and runners reporting a process killed from outside: -9/137 SIGKILL (also the OOM
    # killer; bounded by max_attempts), -15/143 SIGTERM before the engine could report it.
    "Flow run infrastructure exited with non-zero status code -9",
    "Flow run infrastructure exited with non-zero status code 137",
    "Flow run infrastructure exited with non-zero status code -15",
    "Flow run infrastructure exited with non-zero status code 143",
    "Process exited with status code: -9",
    "Process exited with status code: 137",
    "Process exited with status code: -15",
    "Process exited with status code: 143",
    "Flow run process exited with non-zero status code -9",
    "Flow run process exited with non-zero status code 137",
    "Flow run process exited with non-zero status code -15",
    "Flow run process exited with non-zero status code 143",
    # The engine could not reach the API (a server restart or network cut mid-run).
    "Request failed while attempting to contact the server",
)
"""Crashed-state messages that mean "the run's infrastructure was lost", matched as prefixes.

Not here on purpose, because running again would crash the same way or a person asked for it:
"Execution was aborted by an interrupt signal." (Ctrl-C), "Execution was aborted by Python system
exit call." (the flow called sys.exit), "Execution was interrupted by an unexpected exception"
(a bug outside the flow body), other exit codes (1 = an error the process reported), and
"Flow run could not start" (bad code or image)."""
_API_REQUEST_FAILED = ("Request to ", " failed: ")  # "Request to {url} failed: {ConnectError...}."


@dataclass(frozen=True)
class Rescheduled:
    """One run put back in its queue."""

    flow_run_id: UUID
    name: str
    work_pool: str | None
    work_queue: str | None
    attempt: int
    """The attempt the run starts next: 2 after its first loss."""
    max_attempts: int
    reason: str
    """The Crashed state's message."""


def is_lost_infrastructure(message: str | None) -> bool:
    """Whether a Crashed state's message says the run's process, worker or node went away."""
    text = (message or "").strip()
    if any(text.startswith(prefix) for prefix in LOST_INFRASTRUCTURE_MESSAGES):
        return True
    return text.startswith(_API_REQUEST_FAILED[0]) and _API_REQUEST_FAILED[1] in text and (
        "ConnectError" in text or "Timeout" in text or "RemoteProtocolError" in text
    )


NEVER_RETRIED_PREFIXES: tuple[str, ...] = ("Flow run could not start",)
"""Crashes that say the run's code or image is broken: a new attempt would crash the same way."""


def crashed_before_its_body(history: list[State]) -> bool:
    """Whether the run's latest attempt crashed before it ever entered Running.

    Such an attempt ran none of its flow's code, so a new one cannot repeat work, whatever the
    crash said: a flow-run process that could not reach a restarting server exits with status 1
    from Pending, a message that otherwise means the run's own error.
    """
    latest_attempt: list[State] = []
    for state in sorted(history, key=lambda s: s.timestamp):
        if state.type == StateType.SCHEDULED:
            latest_attempt = []
        latest_attempt.append(state)
    return bool(latest_attempt) and latest_attempt[-1].type == StateType.CRASHED and not any(
        state.type == StateType.RUNNING for state in latest_attempt)


def is_ours(flow_run: FlowRun, pools: list[str] | None = None) -> bool:
    """A run of a platform deployment: in one of ``pools`` (default: the platform's), or tagged
    with a priority, which every generated deployment is."""
    if flow_run.deployment_id is None:
        return False  # an ad-hoc run has nowhere to be rescheduled to
    wanted = set(pools) if pools is not None else {pool.name for pool in ALL_POOLS}
    if flow_run.work_pool_name in wanted:
        return True
    return pools is None and any(tag.startswith("priority:") for tag in flow_run.tags)


def count_reschedules(history: list[State]) -> int:
    """How many times this service already rescheduled the run."""
    return sum(1 for state in history if (state.message or "").startswith(RESCHEDULE_MESSAGE_PREFIX))


def _transition_id(flow_run_id: UUID, crashed_state_id: UUID) -> UUID:
    """The same for every proposal made from the same Crashed state, so the server rejects a
    duplicate proposal (PreventDuplicateTransitions) instead of applying it twice."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"taskserver-recovery:{flow_run_id}:{crashed_state_id}")


async def _crashed_runs(client: PrefectClient, since: datetime) -> list[FlowRun]:
    """Crashed deployment runs that ended after ``since``, every page of them."""
    runs: list[FlowRun] = []
    offset = 0
    while True:
        page = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
                deployment_id=FlowRunFilterDeploymentId(is_null_=False),
                end_time=FlowRunFilterEndTime(after_=since),
            ),
            # Every argument explicit: Prefect 3.8.8's client sends nulls that newer FastAPI rejects.
            sort=FlowRunSort.END_TIME_DESC,
            limit=PAGE_SIZE,
            offset=offset,
        )
        runs.extend(page)
        if len(page) < PAGE_SIZE:
            return runs
        offset += PAGE_SIZE


async def reschedule_lost_runs(
    client: PrefectClient,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    lookback: timedelta = DEFAULT_LOOKBACK,
    pools: list[str] | None = None,
    exhausted: set[UUID] | None = None,
) -> list[Rescheduled]:
    """Put every platform run that crashed because its infrastructure was lost back in its queue.

    A run is rescheduled (an ``AwaitingRetry`` Scheduled state, due now) only while it is still
    in the Crashed state this pass read, and only while it has had fewer than ``max_attempts``
    starts. Calling this again, or from two places at once, never reschedules a run twice for one
    crash, nor a run that already left Crashed. Runs out of attempts stay Crashed and are logged
    once per ``exhausted`` set (the caller keeps it between passes; None logs every pass).
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    since = datetime.now(timezone.utc) - lookback
    done: list[Rescheduled] = []
    for candidate in await _crashed_runs(client, since):
        if not is_ours(candidate, pools) or candidate.state is None:
            continue
        crashed = candidate.state
        if (crashed.message or "").startswith(NEVER_RETRIED_PREFIXES):
            continue
        history = await client.read_flow_run_states(candidate.id)
        if is_lost_infrastructure(crashed.message):
            cause = "lost its infrastructure"
        elif crashed_before_its_body(history):
            cause = "crashed before its flow started"
        else:
            continue
        attempt = count_reschedules(history) + 2  # the attempt a reschedule would start
        if attempt > max_attempts:
            if exhausted is None or candidate.id not in exhausted:
                log.error(
                    "Flow run %s (%s) %s again and has had %d of %d attempts; it stays Crashed: %s",
                    candidate.name, candidate.id, cause, attempt - 1, max_attempts, crashed.message,
                )
                if exhausted is not None:
                    exhausted.add(candidate.id)
            continue
        item = await _reschedule(client, candidate, crashed, cause, attempt, max_attempts)
        if item is not None:
            done.append(item)
    return done


async def _reschedule(client: PrefectClient, candidate: FlowRun, crashed: State, cause: str, attempt: int,
                      max_attempts: int) -> Rescheduled | None:
    """Propose AwaitingRetry for ``candidate`` if it is still in the ``crashed`` state; None if not."""
    # Re-read just before proposing: another pass may have moved it on since the listing.
    current = await client.read_flow_run(candidate.id)
    if current.state is None or current.state.id != crashed.id:
        return None
    message = (
        f"{RESCHEDULE_MESSAGE_PREFIX} (attempt {attempt} of {max_attempts}): the previous"
        f" attempt {cause}: {crashed.message}"
    )
    proposed = AwaitingRetry(scheduled_time=datetime.now(timezone.utc), message=message)
    # One transition id per (run, crash): two passes proposing for the same crash are one transition.
    proposed.state_details.transition_id = _transition_id(candidate.id, crashed.id)
    result = await client.set_flow_run_state(candidate.id, proposed, force=False)
    if result.status.value != "ACCEPT":
        log.info("Flow run %s (%s) not rescheduled: the server answered %s (%s)", candidate.name,
                 candidate.id, result.status.value, getattr(result.details, "reason", ""))
        return None
    item = Rescheduled(
        flow_run_id=candidate.id, name=candidate.name, work_pool=candidate.work_pool_name,
        work_queue=candidate.work_queue_name, attempt=attempt, max_attempts=max_attempts,
        reason=crashed.message or "",
    )
    log.warning(
        "Rescheduled flow run %s (%s) in %s/%s, attempt %d of %d: %s", item.name, item.flow_run_id,
        item.work_pool, item.work_queue, attempt, max_attempts, item.reason,
    )
    return item


STRANDED_PENDING_AFTER = timedelta(seconds=60)
"""A warm-lane run Pending this long, whose worker is gone, is put back in its queue."""
WORKER_GONE_AFTER = timedelta(seconds=90)
"""A worker that has not heartbeated for this long (3 x Prefect's default 30 s) is gone."""
WORKER_NAME_LABEL = "prefect.worker.name"


def warm_pools() -> list[str]:
    """Pools whose worker runs the flows in its own processes (interpreters die with it)."""
    return [pool.name for pool in ALL_POOLS if pool.worker_type]


async def requeue_stranded_pending(
    client: PrefectClient,
    *,
    pools: list[str] | None = None,
    stale_after: timedelta = STRANDED_PENDING_AFTER,
    worker_gone_after: timedelta = WORKER_GONE_AFTER,
) -> list[UUID]:
    """Put back in their queue the Pending runs of a warm pool whose worker is gone.

    Pending means no body ran yet, and a warm worker's interpreters die with it, so nothing can
    still start the run: a worker killed while its interpreters were loading leaves such runs,
    which neither the zombie automation (no heartbeat yet) nor the worker itself would recover.
    Job pools are left alone: a Kubernetes Job outlives its worker and may still start.
    """
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
    from prefect.states import Scheduled

    pools = pools if pools is not None else warm_pools()
    if not pools:
        return []
    now = datetime.now(timezone.utc)
    pending = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING])),
            deployment_id=FlowRunFilterDeploymentId(is_null_=False),
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=pools)),
        sort=FlowRunSort.ID_DESC, limit=PAGE_SIZE, offset=0,
    )
    heartbeats: dict[str, dict[str, datetime | None]] = {}
    requeued: list[UUID] = []
    for flow_run in pending:
        state = flow_run.state
        if state is None or state.timestamp is None or now - state.timestamp < stale_after:
            continue
        pool = flow_run.work_pool_name or ""
        if pool not in heartbeats:
            workers = await client.read_workers_for_work_pool(pool, limit=200, offset=0)
            heartbeats[pool] = {w.name: w.last_heartbeat_time for w in workers}
        worker = (flow_run.labels or {}).get(WORKER_NAME_LABEL)
        last = heartbeats[pool].get(worker) if worker else None
        if last is not None and now - last < worker_gone_after:
            continue  # its worker is alive: it is waiting for an interpreter
        current = await client.read_flow_run(flow_run.id)
        if current.state is None or current.state.id != state.id:
            continue
        proposed = Scheduled(
            scheduled_time=now,
            message=f"{RESCHEDULE_MESSAGE_PREFIX}: stranded Pending, its worker {worker or '?'} is gone",
        )
        proposed.state_details.transition_id = _transition_id(flow_run.id, state.id)
        result = await client.set_flow_run_state(flow_run.id, proposed, force=True)
        if result.status.value == "ACCEPT":
            log.warning("Requeued flow run %s (%s) in %s/%s: Pending since %s, worker %s gone",
                        flow_run.name, flow_run.id, pool, flow_run.work_queue_name, state.timestamp,
                        worker or "?")
            requeued.append(flow_run.id)
    return requeued


SILENT_RUN_AFTER = timedelta(seconds=10 * HEARTBEAT_SECONDS)
"""A Running run with no heartbeat for this long is lost: over three zombie windows, and well past
Prefect's own default heartbeat (180 s) for runs that only send those."""
SILENT_RUN_MESSAGE = (
    f"{LOST_INFRASTRUCTURE_MESSAGES[0]} (found by taskserver recovery: no heartbeat for"
    f" {SILENT_RUN_AFTER.total_seconds():.0f}s, and the zombie automation did not fire)"
)


async def _last_heartbeat(client: PrefectClient, flow_run_id: UUID, since: datetime) -> datetime | None:
    response = await client._client.post("/events/filter", json={
        "filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                   "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                   "occurred": {"since": since.isoformat(), "until": datetime.now(timezone.utc).isoformat()}},
        "limit": 1,
    })
    response.raise_for_status()
    events = response.json().get("events") or []
    return datetime.fromisoformat(events[0]["occurred"]) if events else None


async def crash_silent_runs(
    client: PrefectClient, *, pools: list[str] | None = None, silent_after: timedelta = SILENT_RUN_AFTER,
) -> list[UUID]:
    """Mark Crashed the platform runs Running for longer than ``silent_after`` with no heartbeat in it.

    A backstop for the zombie automation: Prefect's trigger evaluation can give up on an event
    (dead-lettered after its retries; see tests/faults/load_support.RETRIED_TRIGGER_RACE), and
    then a zombie would stay Running for good. The Crashed state carries the automation's own
    message, so the next pass reschedules it like any other lost run.
    """
    from prefect.states import Crashed

    now = datetime.now(timezone.utc)
    running = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            deployment_id=FlowRunFilterDeploymentId(is_null_=False),
        ),
        sort=FlowRunSort.ID_DESC, limit=PAGE_SIZE, offset=0,
    )
    crashed: list[UUID] = []
    for flow_run in running:
        state = flow_run.state
        if not is_ours(flow_run, pools) or state is None or state.timestamp is None:
            continue
        if now - state.timestamp < silent_after:
            continue
        if await _last_heartbeat(client, flow_run.id, now - silent_after) is not None:
            continue
        current = await client.read_flow_run(flow_run.id)
        if current.state is None or current.state.id != state.id:
            continue
        proposed = Crashed(message=SILENT_RUN_MESSAGE)
        proposed.state_details.transition_id = _transition_id(flow_run.id, state.id)
        result = await client.set_flow_run_state(flow_run.id, proposed, force=True)
        if result.status.value == "ACCEPT":
            log.warning("Flow run %s (%s) Running since %s sent no heartbeat for %s: marked Crashed",
                        flow_run.name, flow_run.id, state.timestamp, silent_after)
            crashed.append(flow_run.id)
    return crashed


async def serve(
    interval: float = DEFAULT_INTERVAL_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    lookback: timedelta = DEFAULT_LOOKBACK,
    pools: list[str] | None = None,
    once: bool = False,
    heartbeat_file: str | Path | None = None,
) -> None:
    """Pass after pass, forever (or once). An unreachable API is logged and tried again next pass.

    ``heartbeat_file`` (created if missing) is touched after every pass that finished, a failed
    one included once it was logged: a hung pass leaves it stale, which a liveness probe sees.
    """
    exhausted: set[UUID] = set()
    log.info("Recovery service: every %.0fs, at most %d attempts per run, looking back %s, pools %s",
             interval, max_attempts, lookback, pools or "all platform pools")
    while True:
        try:
            async with get_client() as client:
                await crash_silent_runs(client, pools=pools)
                await reschedule_lost_runs(client, max_attempts=max_attempts, lookback=lookback,
                                           pools=pools, exhausted=exhausted)
                await requeue_stranded_pending(
                    client, pools=[p for p in warm_pools() if pools is None or p in pools])
        except Exception as exc:  # noqa: BLE001 - a server restart must not stop the service
            if once:
                raise
            log.warning("Recovery pass failed (%s: %s); trying again in %.0fs", type(exc).__name__, exc, interval)
        if heartbeat_file is not None:
            Path(heartbeat_file).touch()
        if once:
            return
        await asyncio.sleep(interval)


def recover(
    interval: Annotated[float, typer.Option(help="Seconds between passes.")] = DEFAULT_INTERVAL_SECONDS,
    max_attempts: Annotated[int, typer.Option(min=1, help="Starts a run may get in all, the first included.")]
    = DEFAULT_MAX_ATTEMPTS,
    lookback_hours: Annotated[float, typer.Option(help="Only runs that crashed within this many hours.")]
    = DEFAULT_LOOKBACK.total_seconds() / 3600,
    pools: Annotated[Optional[list[str]], typer.Option(  # noqa: UP007 - typer reads Optional
        "--pool", help="Only runs of this work pool (repeatable; default: every platform pool).")] = None,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    heartbeat_file: Annotated[Optional[str], typer.Option(  # noqa: UP007
        metavar="PATH", help="Touch this file after every pass (for a liveness probe on its age).")] = None,
) -> None:
    """Reschedule flow runs lost with their worker, node or pod (reads PREFECT_API_URL)."""
    if interval <= 0:
        raise typer.BadParameter("must be positive", param_hint="--interval")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    asyncio.run(serve(interval, max_attempts, timedelta(hours=lookback_hours), pools or None, once,
                      heartbeat_file))


def main(argv: list[str] | None = None) -> None:
    commands.run(recover, argv, prog="python -m taskserver.platform.recovery")


if __name__ == "__main__":
    main()
