"""Issue 6's load test: TOTAL_RUNS (200 here, 1,000 on request) probe runs across all four priorities drain through the warm lane of a
real Prefect server on Postgres, none lost or duplicated, in priority order, with bounded server
memory and no database-class errors. Figures go to benchmarks/results/load.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from load_support import (  # noqa: I001 - load_support needs tests/integration on sys.path (conftest)
    RssSampler, create_runs, database_errors, error_lines, lost_evaluations, read_flow_runs, retried_trigger_races,
    state_histories,
)
from platform_support import PrefectServer, WorkerProcess, probe_params, read_done, read_starts

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "benchmarks" / "results" / "load.json"

TOTAL_RUNS = int(os.environ.get("TASKSERVER_LOAD_RUNS", "200"))
"""200 in the test command (20 / 40 / 60 / 80 by priority); issue 6's 1,000 with
TASKSERVER_LOAD_RUNS=1000. Cut on 2026-12-01 to keep CI inside its 90 minutes: the warm lane
drains at about 64 runs/min instead of 152 (1,000 runs took 939 s alone, 500 took 1,084 s beside
the rest of the suite in two processes; cause under investigation)."""
SHARE = {"critical": 1, "high": 2, "normal": 3, "low": 4}
"""Tenths of the runs per priority."""
CREATION_PATTERN = ["low", "normal", "high", "low", "critical", "normal", "low", "high", "normal", "low"]
"""One block of ten in creation order: the priorities are interleaved, not queued level by level."""

WORKERS = 1
INTERPRETERS = 2
"""Per worker. One worker: two warm workers race for the same runs and stall (see the report);
4 interpreters drained 100 runs at 120/min against 107/min with 2, on 2 busy cores."""
CAPACITY = WORKERS * INTERPRETERS
PROBE_SECONDS = 0.0
DRAIN_TIMEOUT = 1200.0

RSS_GROWTH_BOUND = 1.25
RSS_SLACK_MB = 64.0
"""The server's memory is bounded when the peak of the last third of the drain is at most 25 %
(+64 MB of allocator slack) above the peak of the first third. A server that kept something per
run (a run, a log line, an event) would grow with the runs it served: by the last third it has
served twice as many as in the first, so such a leak shows up as growth well past this bound,
while caches that fill once and then stay flat (SQLAlchemy, pydantic, the event buffers) pass."""


def _priority_level() -> dict[str, int]:
    from taskserver.platform.priorities import PRIORITIES

    return {level.name: index for index, level in enumerate(PRIORITIES)}


def _backlog(records: Path) -> list[tuple[str, dict]]:
    assert sorted(SHARE) == sorted(_priority_level()), "the test must cover every priority"
    assert sorted(CREATION_PATTERN) == sorted(p for p, n in SHARE.items() for _ in range(n))
    counters = {priority: 0 for priority in SHARE}
    items = []
    for index in range(TOTAL_RUNS):
        priority = CREATION_PATTERN[index % len(CREATION_PATTERN)]
        label = f"{priority}-{counters[priority]:04d}"
        counters[priority] += 1
        items.append((f"probe/{priority}-warm", probe_params(label, records, PROBE_SECONDS)))
    return items


@pytest.fixture
def server(postgres_url, tmp_path):
    """A real Prefect server on the throwaway Postgres, bootstrapped like the stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from taskserver.platform.bootstrap import bootstrap
    from taskserver.platform.tasks import DIAGNOSTIC_TASKS

    started = PrefectServer(tmp_path / "server", postgres_url).start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: started.api_url}):
            bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
            yield started
    finally:
        started.stop()


def _family_rss_mb(pid: int | None) -> float:
    """Resident memory of a process and its children (PostgreSQL's backends, uvicorn's workers)."""
    if pid is None:
        return 0.0
    root = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)


def test_a_backlog_of_runs_drains_in_priority_order_without_loss(server, postgres_cluster, records, tmp_path):
    """TOTAL_RUNS runs (a tenth critical, two high, three normal, four low, interleaved) are queued before any
    worker starts; then the warm lane drains them.

    Priority rule, from the design: the server hands a polling worker its Scheduled runs highest
    queue priority first, a worker takes only as many as it has free slots (its interpreters),
    and the warm worker gives an interpreter to no run while a higher-priority run it picked up
    has not yet taken one. So:

    1. No run's body starts while a run of strictly higher priority is still Scheduled (not yet
       picked up): its start time is after every higher-priority run's Pending time.
    2. When a run's body starts, the higher-priority runs whose bodies have not started yet are
       all in flight, each holding one of the other CAPACITY - 1 slots: at most CAPACITY - 1
       higher-priority runs start after any run (the overlap of one poll batch at a priority
       boundary; at most 1 with one worker of 2 interpreters).
    """
    items = _backlog(records)
    created_at = time.time()
    created = create_runs(items)
    creation_seconds = time.time() - created_at
    ids = [flow_run_id for flow_run_id, _ in created]
    label_of = {flow_run_id: parameters["label"] for flow_run_id, (_, parameters) in zip(ids, items)}
    priority_of = {label: label.split("-")[0] for label in label_of.values()}
    assert len(set(ids)) == TOTAL_RUNS
    assert {r.state.type.value for r in read_flow_runs(ids).values()} == {"SCHEDULED"}

    sampler = RssSampler(server.process.pid).start()
    workers = []
    try:
        env = {"TASKSERVER_WARM_PRELOAD": "flows"}
        workers = [WorkerProcess("warm", INTERPRETERS, server.api_url, tmp_path / f"warm-{n}.log", "warm", "0.25",
                                 env=env).start() for n in range(WORKERS)]
        workers_started = time.time()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while len(read_done(records)) < TOTAL_RUNS and time.monotonic() < deadline:
            assert all(w.process.poll() is None for w in workers), "a warm worker exited during the drain"
            time.sleep(1.0)
        drained_at = time.time()
        runs = read_flow_runs(ids)
        settle = time.monotonic() + 60  # the last runs' Completed states may trail their end records
        while not all(r.state and r.state.is_final() for r in runs.values()) and time.monotonic() < settle:
            time.sleep(1.0)
            runs = read_flow_runs(ids)
    finally:
        for worker in workers:
            worker.stop()
        samples = sampler.stop()

    rss_after = {"prefect_server": _family_rss_mb(server.process.pid),
                 "postgres": _family_rss_mb(postgres_cluster.postmaster_pid())}
    starts, done = read_starts(records), read_done(records)
    histories = state_histories(ids)
    start_times = {label: rows[0]["started"] for label, rows in starts.items()}
    first_start = min(start_times.values(), default=workers_started)
    last_end = max((record["ended"] for record in done.values()), default=drained_at)
    drain_seconds = last_end - first_start
    third = drain_seconds / 3
    rss_first = sampler.peak_between(first_start, first_start + third)
    rss_last = sampler.peak_between(last_end - third, last_end)
    server_log = server.home / "server.log"
    db_errors = database_errors(server_log)
    server_errors = error_lines(server_log)
    trigger_races = retried_trigger_races(server_log)
    lost = lost_evaluations(server_log)
    worker_errors = [line for w in workers for line in error_lines(w.log)]

    states = {label_of[i]: (r.state.type.value if r.state else "?") for i, r in runs.items()}
    level = _priority_level()
    pending_at = {label_of[i]: min((t for kind, t in h if kind == "PENDING"), default=float("inf"))
                  for i, h in histories.items()}
    # Rule 1: a run whose body started while a higher-priority run was still Scheduled.
    latest_pending = {p: max(t for lbl, t in pending_at.items() if priority_of[lbl] == p) for p in SHARE}
    jumped = sorted(label for label, started in start_times.items()
                    if any(latest_pending[p] > started for p in SHARE if level[p] < level[priority_of[label]]))
    # Rule 2: when a run's body started, more than CAPACITY - 1 higher-priority bodies had yet to start.
    order = sorted(start_times, key=start_times.get)
    started_later = {index: 0 for index in level.values()}
    overtaking = {}
    for label in reversed(order):
        mine = level[priority_of[label]]
        higher_later = sum(n for index, n in started_later.items() if index < mine)
        if higher_later > CAPACITY - 1:
            overtaking[label] = higher_later
        started_later[mine] += 1
    boundary_overlaps = sum(1 for a, b in zip(order, order[1:]) if level[priority_of[a]] > level[priority_of[b]])

    throughput = TOTAL_RUNS / drain_seconds * 60 if drain_seconds > 0 else 0.0
    report = {
        "runs": TOTAL_RUNS,
        "by_priority": {p: sum(1 for v in priority_of.values() if v == p) for p in SHARE},
        "workers": WORKERS, "interpreters_per_worker": INTERPRETERS, "probe_seconds": PROBE_SECONDS,
        "database": "postgresql (throwaway cluster, asyncpg)",
        "creation_seconds": round(creation_seconds, 1),
        "worker_start_to_first_body_seconds": round(first_start - workers_started, 1),
        "drain_seconds": round(drain_seconds, 1),
        "runs_per_minute": round(throughput, 1),
        "states": {s: list(states.values()).count(s) for s in sorted(set(states.values()))},
        "labels_started": len(starts), "labels_ended": len(done),
        "duplicate_starts": sorted(label for label, rows in starts.items() if len(rows) > 1),
        "priority_boundary_overlaps": boundary_overlaps,
        "rss_mb": {
            "min": round(min((mb for _, mb in samples), default=0.0), 1),
            "max": round(max((mb for _, mb in samples), default=0.0), 1),
            "first_third_peak": round(rss_first, 1), "last_third_peak": round(rss_last, 1),
            "bound": f"last-third peak <= {RSS_GROWTH_BOUND} x first-third peak + {RSS_SLACK_MB:.0f} MB",
            "series": [[round(t - first_start, 1), round(mb, 1)] for t, mb in samples],
        },
        "rss_mb_after_drain": rss_after,
        "server_database_errors": db_errors,
        "server_retried_trigger_races": trigger_races,
        "server_dead_lettered_events": lost,
        "server_error_lines": server_errors,
        "worker_error_lines": worker_errors,
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1))
    print(
        f"\nLoad: {TOTAL_RUNS} runs ({report['by_priority']}) created in {creation_seconds:.0f}s, drained by"
        f" {WORKERS} warm worker(s) x {INTERPRETERS} interpreters in {drain_seconds:.0f}s"
        f" ({throughput:.0f} runs/min) on Postgres; states {report['states']};"
        f" {boundary_overlaps} adjacent priority overlaps; server RSS {report['rss_mb']['min']:.0f}-"
        f"{report['rss_mb']['max']:.0f} MB (first third peak {rss_first:.0f}, last third {rss_last:.0f});"
        f" {len(db_errors)} database-class error lines, {len(server_errors)} server error lines,"
        f" {len(worker_errors)} worker error lines; {trigger_races} retried trigger races, {len(lost)} dead-lettered"
        f" events; RSS after the drain: server {rss_after['prefect_server']:.0f} MB, PostgreSQL"
        f" {rss_after['postgres']:.0f} MB. Report: {REPORT}"
    )

    # None lost, none duplicated: every run Completed, one body start and one end record per label.
    assert len(done) == TOTAL_RUNS, f"{TOTAL_RUNS - len(done)} runs never wrote their end record"
    assert states == {label: "COMPLETED" for label in label_of.values()}, {
        k: v for k, v in states.items() if v != "COMPLETED"}
    assert sorted(starts) == sorted(label_of.values())
    assert not report["duplicate_starts"], report["duplicate_starts"]
    assert sorted(done) == sorted(label_of.values())
    # Priority order (rules 1 and 2 of the docstring).
    assert not jumped, jumped[:10]
    assert not overtaking, dict(list(overtaking.items())[:10])
    # No database-class errors on Postgres; no tracebacks in the server log. Prefect's own retried
    # trigger race (load_support.RETRIED_TRIGGER_RACE) is allowed; an event it gave up on is not.
    assert not lost, lost[:20]
    assert not db_errors, db_errors[:20]
    assert not [line for line in server_errors if "Traceback" in line], server_errors[:20]
    # Bounded server memory.
    assert samples and rss_last <= rss_first * RSS_GROWTH_BOUND + RSS_SLACK_MB, report["rss_mb"]

