"""The warm lane against a real server: isolation, bounded memory, priority order, parity, models
kept warm. Every run goes through the real `taskserver-warm` worker and its interpreters."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

from platform_support import (
    WorkerProcess, _delete_unfinished_runs, probe_params, read_done, read_starts, run, wait_until,
)

pytestmark = pytest.mark.timeout(900)

WARM_ENV = {"TASKSERVER_WARM_PRELOAD": "encoder,flows"}
POLL_IN_FLIGHT_SECONDS = 1.0
"""Four of the warm worker's 0.25 s poll intervals: longer than one poll takes to read the queues
and mark what it read Pending, even on a loaded CI machine."""


async def _create(deployment_name: str, parameters: dict) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(deployment_name)
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return str(flow_run.id)


async def _create_many(items: list[tuple[str, dict]]) -> list[str]:
    from prefect.client.orchestration import get_client

    ids = []
    async with get_client() as client:
        deployments = {}
        for name, parameters in items:
            if name not in deployments:
                deployments[name] = await client.read_deployment_by_name(name)
            flow_run = await client.create_flow_run_from_deployment(deployments[name].id, parameters=parameters)
            ids.append(str(flow_run.id))
    return ids


async def _states(ids: list[str]) -> dict[str, object]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    found = {}
    async with get_client() as client:
        for start in range(0, len(ids), 200):
            chunk = [UUID(i) for i in ids[start:start + 200]]
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)),
                sort=FlowRunSort.ID_DESC, limit=len(chunk), offset=0,
            )
            found.update({str(r.id): r for r in runs})
    return found


def _wait_final(ids: list[str], timeout: float) -> dict[str, object]:
    def done():
        states = run(_states(ids))
        if len(states) == len(ids) and all(s.state and s.state.is_final() for s in states.values()):
            return states
        return None

    return wait_until(done, timeout, f"{len(ids)} warm runs to finish", interval=1.0)


def _not_completed(states: dict[str, object]) -> list[str]:
    """Each run that did not complete, with its state's message: what a failing test prints."""
    return [f"{s.name}: {s.state.type.value}: {s.state.message}"
            for s in states.values() if s.state.type.value != "COMPLETED"]


def _result(flow_run) -> dict:
    from prefect.states import get_state_result

    value = get_state_result(flow_run.state, raise_on_failure=True)
    return run(value) if hasattr(value, "__await__") else value


@pytest.fixture
def warm(start_worker, tmp_path):
    """A warm worker with 2 interpreters; its results persist under tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    env = {**WARM_ENV, "TASKSERVER_DATA_DIR": str(data), "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
           "PREFECT_LOCAL_STORAGE_PATH": str(data / "prefect-results")}
    return start_worker("warm", slots=2, env=env)


def _interpreter_pids(worker: WorkerProcess) -> list[int]:
    pids = []
    for child in psutil.Process(worker.process.pid).children():
        try:
            if any("warm_interpreter" in part for part in child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def _rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.NoSuchProcess:
        return 0.0


def test_a_crashing_run_takes_only_its_interpreter_and_is_marked_crashed(warm, records):
    faults = ["raise", "segfault", "kill", "exit"]
    ids = run(_create_many([("probe/high-warm", {**probe_params(f"f-{fault}", records, 0), "fault": fault})
                            for fault in faults]))
    states = _wait_final(ids, 300)
    by_fault = dict(zip(faults, (states[i] for i in ids)))
    assert by_fault["raise"].state.type.value == "FAILED"
    assert "failing on purpose" in by_fault["raise"].state.message
    for fault, code in (("segfault", "-11"), ("kill", "-9"), ("exit", "3")):
        assert by_fault[fault].state.type.value == "CRASHED", (fault, by_fault[fault].state)
        assert f"status code {code}" in by_fault[fault].state.message, by_fault[fault].state.message
    # Every fault ran its body exactly once: a crash is not retried behind the user's back.
    assert {label: len(starts) for label, starts in read_starts(records).items()} == {
        f"f-{fault}": 1 for fault in faults}

    # The worker kept serving: same process, replacement interpreters, later runs complete.
    assert warm.process.poll() is None
    after = run(_create_many([("probe/high-warm", probe_params(f"after-{i}", records, 0)) for i in range(4)]))
    assert not _not_completed(_wait_final(after, 300))
    assert warm.process.poll() is None
    assert len(_interpreter_pids(warm)) == 2


MEMORY_RUNS = 60
"""Enough for a dozen recyclings by RSS, about five runs each. Each recycling loads a fresh
interpreter (10-20 s on 2 busy cores), which is what this test's time goes to: 100 runs with a
recycling every 3 runs did not finish in 600 s beside the rest of the suite (2026-12-01)."""


def test_memory_stays_bounded_over_60_runs(start_worker, records, tmp_path):
    """Each run leaks 25 MB on purpose; interpreters are recycled by RSS and by run count.

    The runs are queued before the worker starts: a burst of creations beside a worker polling
    every 0.25 s made the session's SQLite server answer 503 (2026-12-01)."""
    max_rss, leak, max_runs = 470.0, 25, 30
    items = [("probe/normal-warm", {**probe_params(f"m{i:03d}", records, 0), "allocate_mb": leak})
             for i in range(MEMORY_RUNS)]
    ids = run(_create_many(items))
    worker = start_worker("warm", slots=2, env={
        "TASKSERVER_WARM_PRELOAD": "flows", "TASKSERVER_WARM_MAX_RSS_MB": str(max_rss),
        "TASKSERVER_WARM_MAX_RUNS": str(max_runs)})
    peak: dict[int, float] = {}
    deadline = time.monotonic() + 660
    while time.monotonic() < deadline:
        for pid in _interpreter_pids(worker):
            peak[pid] = max(peak.get(pid, 0.0), _rss_mb(pid))
        if len(read_done(records)) == MEMORY_RUNS:
            break
        time.sleep(0.2)
    states = _wait_final(ids, 120)
    assert len(states) == MEMORY_RUNS and not _not_completed(states)
    starts = read_starts(records)
    assert sorted(starts) == sorted(f"m{i:03d}" for i in range(MEMORY_RUNS))
    assert all(len(v) == 1 for v in starts.values())
    runs_per_pid: dict[int, int] = {}
    for (record,) in starts.values():
        runs_per_pid[record["pid"]] = runs_per_pid.get(record["pid"], 0) + 1
    # Recycled: many interpreters served the runs, none more than max_runs of them.
    assert len(runs_per_pid) > 4 and max(runs_per_pid.values()) <= max_runs, runs_per_pid
    # Bounded: an interpreter is checked after each run, so it may pass the bound by one run's leak.
    # Without recycling it would reach ~baseline + 30 runs x 25 MB = 750 MB more.
    assert peak and max(peak.values()) <= max_rss + leak + 30, peak


def test_priority_order_holds_under_saturation(start_worker, records):
    """A backlog queued before the warm worker starts: criticals first, then normal, then low."""
    assert run(_delete_unfinished_runs()) >= 0
    items = [("probe/low-warm", probe_params(f"low-{i}", records, 0.3)) for i in range(10)]
    items += [("probe/normal-warm", probe_params(f"normal-{i}", records, 0.3)) for i in range(10)]
    items += [("probe/critical-warm", probe_params(f"critical-{i}", records, 0.3)) for i in range(3)]
    ids = run(_create_many(items))
    start_worker("warm", slots=2, env=WARM_ENV)
    states = _wait_final(ids, 400)
    assert not _not_completed(states)
    started = {label: rows[0]["started"] for label, rows in read_starts(records).items()}
    level = lambda name: [t for label, t in started.items() if label.startswith(name)]  # noqa: E731
    assert max(level("critical")) < min(level("normal")), started
    assert max(level("normal")) < min(level("low")), started

    # Arrivals under load: lows fill both interpreters, criticals arrive and jump the queue.
    arrivals = tmp = records / "arrivals"
    tmp.mkdir()
    lows = run(_create_many([("probe/low-warm", probe_params(f"low-{i}", arrivals, 2.0)) for i in range(14)]))
    wait_until(lambda: len(read_starts(arrivals)) >= 2, 120, "the first lows to start", interval=0.1)
    crits = run(_create_many([("probe/critical-warm", probe_params(f"critical-{i}", arrivals, 0.5))
                              for i in range(3)]))
    states = _wait_final(lows + crits, 300)
    assert not _not_completed(states)
    started = {rows[0]["flow_run_id"]: rows[0]["started"] for rows in read_starts(arrivals).values()}
    picked = run(_pending_times(lows))
    # A low still waiting in its queue when a critical arrived starts after it. "Still waiting"
    # means picked up (Pending) a full poll cycle after the critical existed: a poll already in
    # flight when the critical was written reads the queues without it (seen in CI: a low read
    # just before a critical's insert went Pending 3 ms after it).
    pairs = [(c, low) for c in crits for low in lows
             if picked[low] > states[c].created.timestamp() + POLL_IN_FLIGHT_SECONDS]
    assert pairs, "every low had been picked up before the criticals arrived: nothing was tested"
    late = [(c, low) for c, low in pairs if not started[c] < started[low]]
    assert not late, late


async def _pending_times(ids: list[str]) -> dict[str, float]:
    """When each run was picked up: the timestamp of its Pending state."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    async with get_client() as client:
        times = {}
        for flow_run_id in ids:
            states = await client.read_flow_run_states(UUID(flow_run_id))
            times[flow_run_id] = min(s.timestamp.timestamp() for s in states if s.type.value == "PENDING")
        return times


def test_results_are_identical_to_the_job_lane_and_the_model_stays_loaded(warm, start_worker, tmp_path):
    data = tmp_path / "data"
    job_env = {"TASKSERVER_DATA_DIR": str(data), "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
               "PREFECT_LOCAL_STORAGE_PATH": str(data / "prefect-results")}
    start_worker("cpu", slots=1, env=job_env)
    texts = ["priority queues for ML work", "warm interpreters keep the model loaded",
             "a segfault takes only its own interpreter down", "ünïcödé and emoji 🚀 survive"]
    common = {"texts": texts, "use_cache": False}
    ids = run(_create_many([
        ("encode/high", {**common, "output": str(data / "warm-1.npz")}),
        ("encode/high", {**common, "output": str(data / "warm-2.npz")}),
        ("encode/high-job", {**common, "output": str(data / "job.npz")}),
    ]))
    states = _wait_final(ids, 400)
    warm_1, warm_2, job = (states[i] for i in ids)
    assert (warm_1.work_pool_name, job.work_pool_name) == ("warm", "cpu")
    assert not _not_completed(states)

    vectors = {name: np.load(data / f"{name}.npz") for name in ("warm-1", "warm-2", "job")}
    for name in ("warm-1", "warm-2"):
        assert np.array_equal(vectors[name]["vectors"], vectors["job"]["vectors"]), name
        assert list(vectors[name]["ids"]) == list(vectors["job"]["ids"])

    summaries = [_result(s) for s in (warm_1, warm_2, job)]
    # The interpreters loaded the model before their first run; a job process loads it per run.
    assert [s["model_loads"] for s in summaries] == [0, 0, 1]
    strip = lambda s: {k: v for k, v in s.items() if k not in {"output", "seconds", "model_loads"}}  # noqa: E731
    assert strip(summaries[0]) == strip(summaries[1]) == strip(summaries[2])


def test_a_warm_run_is_observable_like_a_job_run(warm, records):
    """Logs, state history, timings and the worker's heartbeat reach the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    (flow_run_id,) = run(_create_many([("probe/high-warm", probe_params("seen", records, 0))]))
    final = _wait_final([flow_run_id], 300)[flow_run_id]
    assert final.state.type.value == "COMPLETED" and final.start_time and final.end_time

    async def details():
        from uuid import UUID

        async with get_client() as client:
            states = await client.read_flow_run_states(UUID(flow_run_id))
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])),
                                          limit=200, offset=0)
            return [s.type.value for s in states], [log.message for log in logs]

    def ready():
        states, logs = run(details())
        return (states, logs) if any("Finished in state Completed" in m for m in logs) else None

    states, logs = wait_until(ready, 60, "the run's logs to arrive")
    assert states[0] == "SCHEDULED" and "PENDING" in states and "RUNNING" in states and states[-1] == "COMPLETED"
    assert any("Beginning flow run" in m for m in logs)


def test_two_warm_workers_share_the_queues_without_stalling(start_worker, records):
    """Regression: with two workers, runs one worker announced but the other took must not hold
    the first worker's interpreters back (that stalled the lane for good)."""
    assert run(_delete_unfinished_runs()) >= 0
    items = [(f"probe/{level}-warm", probe_params(f"{level}-{i}", records, 0.2))
             for i in range(8) for level in ("low", "normal", "high")]
    ids = run(_create_many(items))
    for _ in range(2):
        start_worker("warm", slots=2, env={"TASKSERVER_WARM_PRELOAD": "flows"})
    states = _wait_final(ids, 300)
    assert not _not_completed(states)
    assert all(len(rows) == 1 for rows in read_starts(records).values())
    assert len(read_starts(records)) == len(items)
