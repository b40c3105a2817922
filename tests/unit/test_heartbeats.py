"""Flow runs heartbeat from their own hooks, not from the engine's 1 s-per-run thread.

The job lane's deployments set ``TASKSERVER_RUN_HEARTBEAT_SECONDS``; the runs must then send
``prefect.flow-run.heartbeat`` events (what arms the zombie automation) from Running on, and
stop when they end. The lost-worker fault test checks the other half: a killed run stops
beating and is found.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prefect import flow

from taskserver.flows.heartbeats import RUN_HEARTBEAT_ENV, heartbeat_hooks
from taskserver.settings import reload_settings


@flow(name="heartbeat-check", **heartbeat_hooks())
def beating(seconds: float) -> str:
    from prefect.runtime import flow_run

    time.sleep(seconds)
    return str(flow_run.id)


def _heartbeat_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("heartbeat-") and t.is_alive()]


async def _heartbeats_of(run_id: str) -> int:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        response = await client._client.post("/events/filter", json={
            "filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]}},
            "limit": 50,
        })
        response.raise_for_status()
        return len(response.json()["events"])


@pytest.fixture
def heartbeat_every_second(monkeypatch):
    monkeypatch.setenv(RUN_HEARTBEAT_ENV, "1")
    reload_settings()
    yield
    monkeypatch.delenv(RUN_HEARTBEAT_ENV)
    reload_settings()


def test_a_run_heartbeats_from_running_on_and_stops_when_it_ends(prefect_harness, heartbeat_every_second):
    from prefect.events.worker import EventsWorker

    run_id = beating(2.5)
    assert not any(name.endswith(run_id) for name in _heartbeat_threads()), "the heartbeat thread outlived its run"
    EventsWorker.drain_all(timeout=10)

    deadline = time.monotonic() + 60
    count = 0
    while time.monotonic() < deadline:  # the server persists events in batches
        count = asyncio.run(_heartbeats_of(run_id))
        if count >= 3:
            break
        time.sleep(0.5)
    # one at Running, then one a second while the 2.5 s body runs
    assert count >= 3, f"{count} heartbeats reached the server"


def test_without_the_setting_a_run_starts_no_heartbeat_thread(prefect_harness, monkeypatch):
    monkeypatch.delenv(RUN_HEARTBEAT_ENV, raising=False)
    reload_settings()
    seen: list[list[str]] = []

    @flow(name="heartbeat-off", **heartbeat_hooks())
    def quiet() -> None:
        time.sleep(0.2)
        seen.append(_heartbeat_threads())

    quiet()
    assert seen == [[]]
