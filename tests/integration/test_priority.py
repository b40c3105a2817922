"""Priority behaviour on a real server with real priority workers, measured by flow-body start times."""

from __future__ import annotations


import pytest

from taskserver.platform.bootstrap import Limits, bootstrap
from taskserver.platform.submission import submit
from taskserver.platform.tasks import DIAGNOSTIC_TASKS

from platform_support import probe_params, read_done, read_starts, run, scheduled_labels, wait_until

pytestmark = pytest.mark.usefixtures("clean_queues")


def _first_starts(records) -> dict[str, float]:
    starts = read_starts(records)
    twice = {label: len(s) for label, s in starts.items() if len(s) != 1}
    assert not twice, f"runs whose body started more than once: {twice}"
    return {label: s[0]["started"] for label, s in starts.items()}


def _order_evidence(records, worker_log) -> str:
    """For a failed order assertion: the body start order, and the worker's lines about each run."""
    starts = {label: found[0] for label, found in read_starts(records).items()}
    first = min(record["started"] for record in starts.values())
    order = sorted(starts.items(), key=lambda item: item[1]["started"])
    labels = {record["flow_run_id"]: label for label, record in starts.items()}
    lines = []
    for line in worker_log.read_text(errors="replace").splitlines():
        if any(word in line for word in ("submitting", "Waiting for", "Requeued", "exited", "Crash", "rror", "bort", "eject", "WARNING")):
            for run_id, label in labels.items():
                line = line.replace(run_id, label)
            lines.append(line)
    return ("body starts: " + ", ".join(f"{label}@{r['started'] - first:.1f}s" for label, r in order)
            + "\nworker log:\n" + "\n".join(lines[-80:]))


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_backlog_every_critical_run_starts_before_any_normal_or_low_run(start_worker, records):
    for i in range(10):
        submit("probe", "low", probe_params(f"low{i}", records))
    for i in range(10):
        submit("probe", "normal", probe_params(f"normal{i}", records))
    for i in range(3):
        submit("probe", "critical", probe_params(f"critical{i}", records))

    worker = start_worker("cpu", slots=2)
    wait_until(lambda: len(read_done(records)) == 23, timeout=300, what="23 probe runs to finish")

    started = _first_starts(records)
    by_level = {lvl: [t for label, t in started.items() if label.startswith(lvl)]
                for lvl in ("critical", "normal", "low")}
    why = _order_evidence(records, worker.log)  # this test failed once in CI without a trace
    assert max(by_level["critical"]) < min(by_level["normal"] + by_level["low"]), why
    assert max(by_level["normal"]) < min(by_level["low"]), why


def test_critical_arrivals_under_load_start_ahead_of_every_waiting_lower_run(start_worker, records):
    start_worker("cpu", slots=2)
    for i in range(6):
        submit("probe", "low", probe_params(f"low{i}", records, seconds=2.0))
    wait_until(lambda: len(read_starts(records)) >= 2, timeout=120, what="two low runs filling both slots")
    for i in range(2):
        submit("probe", "critical", probe_params(f"critical{i}", records, seconds=0.5))
    # Taken after the critical runs exist: every low run still Scheduled now was waiting beside them.
    waiting = run(scheduled_labels("probe/low"))
    assert len(waiting) >= 2, "the scenario needs low runs still waiting when the critical ones arrive"

    wait_until(lambda: len(read_done(records)) == 8, timeout=240, what="all runs to finish")
    started = _first_starts(records)
    critical = [t for label, t in started.items() if label.startswith("critical")]
    assert max(critical) < min(started[label] for label in waiting)


def test_pool_and_queue_concurrency_limits_hold(start_worker, records):
    bootstrap(extra_tasks=DIAGNOSTIC_TASKS,
              limits=Limits.parse(["cpu=2"], ["cpu/low=1"]))
    try:
        for i in range(3):
            submit("probe", "low", probe_params(f"low{i}", records, seconds=1.5))
            submit("probe", "normal", probe_params(f"normal{i}", records, seconds=1.5))
        start_worker("cpu", slots=4)  # more slots than the pool allows: the server must cap it
        wait_until(lambda: len(read_done(records)) == 6, timeout=240, what="six probe runs to finish")
    finally:
        bootstrap(extra_tasks=DIAGNOSTIC_TASKS, limits=Limits())

    done = read_done(records)
    low = [(r["started"], r["ended"]) for label, r in done.items() if label.startswith("low")]
    assert _max_overlap(low) <= 1
    assert _max_overlap([(r["started"], r["ended"]) for r in done.values()]) <= 2
