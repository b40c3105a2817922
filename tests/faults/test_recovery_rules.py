"""The recovery service's rules on a real server, without workers: which crashes it reschedules,
how often, and that calling it again changes nothing."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed, Pending, Running

from taskserver.flows.heartbeats import emit_run_heartbeat
from taskserver.platform.recovery import crash_silent_runs, is_lost_infrastructure, reschedule_lost_runs

from fault_support import create_runs, read_runs
from platform_support import probe_params, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

ZOMBIE = "Flow run marked as crashed due to missing heartbeats."


@pytest.mark.parametrize(("message", "lost"), [
    (ZOMBIE, True),
    ("Execution was aborted by a termination signal.", True),
    ("Flow run infrastructure exited with non-zero status code -9. Process was killed.", True),
    ("Process exited with status code: 143. Process was terminated.", True),
    ("Request to http://127.0.0.1:4200/api/flow_runs/x/set_state failed: httpx.ConnectError: refused.", True),
    ("Execution was aborted by Python system exit call.", False),
    ("Execution was aborted by an interrupt signal.", False),
    ("Execution was interrupted by an unexpected exception: ValueError: bad", False),
    ("Flow run infrastructure exited with non-zero status code 1.", False),
    ("Flow run could not start: ImportError", False),
    (None, False),
])
def test_only_lost_infrastructure_counts_as_lost(message, lost):
    assert is_lost_infrastructure(message) is lost


async def _crash(run_id, message: str, reached_running: bool = True) -> None:
    async with get_client() as client:
        await client.set_flow_run_state(run_id, Pending(), force=True)
        if reached_running:
            await client.set_flow_run_state(run_id, Running(), force=True)
        await client.set_flow_run_state(run_id, Crashed(message=message), force=True)


async def _recover(**kwargs) -> list:
    async with get_client() as client:
        return await reschedule_lost_runs(client, **kwargs)


def test_a_lost_run_is_rescheduled_once_per_crash_until_its_attempts_run_out(prefect_server, records, clean_queues):
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        [lost, own_exit] = create_runs("probe/low", [probe_params("lost", records), probe_params("exit", records)])
        asyncio.run(_crash(lost, ZOMBIE))
        asyncio.run(_crash(own_exit, "Execution was aborted by Python system exit call."))

        first = asyncio.run(_recover(max_attempts=3))
        assert [(r.flow_run_id, r.attempt) for r in first] == [(lost, 2)]
        assert asyncio.run(_recover(max_attempts=3)) == []  # again: nothing to do, nothing doubled
        runs = read_runs([lost, own_exit])
        assert runs[lost].state_type == "SCHEDULED" and runs[lost].state_name == "AwaitingRetry"
        assert runs[lost].message.startswith("Rescheduled by taskserver recovery (attempt 2 of 3)")
        assert runs[own_exit].state_type == "CRASHED"  # would crash the same way again

        asyncio.run(_crash(lost, ZOMBIE))
        assert [r.attempt for r in asyncio.run(_recover(max_attempts=3))] == [3]
        asyncio.run(_crash(lost, ZOMBIE))
        exhausted: set = set()
        assert asyncio.run(_recover(max_attempts=3, exhausted=exhausted)) == []
        assert exhausted == {lost}
        assert read_runs([lost])[lost].state_type == "CRASHED"  # out of attempts: stays Crashed


def test_a_run_that_crashed_before_its_body_is_rescheduled_whatever_the_message(prefect_server, records, clean_queues):
    """A flow-run process that cannot reach a restarting server exits 1 from Pending: nothing of the
    flow ran, so a new attempt cannot repeat work. The same exit after Running is the run's own."""
    exit_one = "Process exited with status code: 1. Process exited with a general error."
    [before_body, after_body, broken] = create_runs(
        "probe/low", [probe_params(label, records) for label in ("before", "after", "broken")])
    asyncio.run(_crash(before_body, exit_one, reached_running=False))
    asyncio.run(_crash(after_body, exit_one))
    asyncio.run(_crash(broken, "Flow run could not start: ImportError: no module named 'flows'",
                       reached_running=False))

    rescheduled = asyncio.run(_recover(max_attempts=3))

    assert [r.flow_run_id for r in rescheduled] == [before_body]
    runs = read_runs([before_body, after_body, broken])
    assert runs[before_body].state_name == "AwaitingRetry"
    assert "crashed before its flow started" in runs[before_body].message
    assert runs[after_body].state_type == "CRASHED" and runs[broken].state_type == "CRASHED"


async def _run_for(run_id):
    async with get_client() as client:
        return await client.read_flow_run(run_id)


async def _heartbeats_of(run_id) -> int:
    async with get_client() as client:
        response = await client._client.post("/events/filter", json={
            "filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 5})
        return len(response.json()["events"])


def test_a_running_run_that_stopped_heartbeating_is_crashed_then_rescheduled(prefect_server, records, clean_queues):
    """The backstop for a zombie the automation missed: Running too long with no heartbeat."""
    from datetime import timedelta

    from prefect.events.worker import EventsWorker

    silent = timedelta(seconds=20)  # the heartbeat below must still be inside it when the guard runs
    [quiet, beating] = create_runs("probe/low", [probe_params("quiet", records), probe_params("beating", records)])
    for run_id in (quiet, beating):
        asyncio.run(_crash_free_start(run_id))
    wait_until(lambda: all(_age(run_id) > silent.total_seconds() for run_id in (quiet, beating)), 60,
               "both runs to be Running for longer than the silence window")
    emit_run_heartbeat(asyncio.run(_run_for(beating)))
    EventsWorker.drain_all(timeout=10)
    wait_until(lambda: asyncio.run(_heartbeats_of(beating)) > 0, 60, "the heartbeat to reach the server")

    async def guard():
        async with get_client() as client:
            return await crash_silent_runs(client, silent_after=silent)

    assert asyncio.run(guard()) == [quiet]
    assert asyncio.run(guard()) == []  # again: nothing doubled
    runs = read_runs([quiet, beating])
    assert runs[quiet].state_type == "CRASHED" and is_lost_infrastructure(runs[quiet].message)
    assert runs[beating].state_type == "RUNNING"
    assert [r.flow_run_id for r in asyncio.run(_recover(max_attempts=3))] == [quiet]


async def _crash_free_start(run_id) -> None:
    async with get_client() as client:
        await client.set_flow_run_state(run_id, Pending(), force=True)
        await client.set_flow_run_state(run_id, Running(), force=True)


def _age(run_id) -> float:
    from datetime import datetime, timezone

    state = asyncio.run(_run_for(run_id)).state
    return (datetime.now(timezone.utc) - state.timestamp).total_seconds()
