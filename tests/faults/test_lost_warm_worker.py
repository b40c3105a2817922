"""A warm-lane worker lost with its node: its interpreters die with it, and every run it held
(Running in an interpreter, or Pending while the interpreters were still loading) is found,
put back in its queue and completed exactly once by the next warm worker.

Running runs are found through the heartbeats the warm worker emits for them (the zombie
automation, 90 s); Pending ones through the worker's own heartbeat going stale (recovery).
"""

from __future__ import annotations

import psutil
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from fault_support import (
    RecoveryService, create_runs, kill_like_a_lost_node, read_runs, state_types, wait_for, wait_for_heartbeats,
)
from platform_support import probe_params, read_done, read_starts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

ZOMBIE_MESSAGE = "Flow run marked as crashed due to missing heartbeats."


def _interpreters(worker) -> list[psutil.Process]:
    return [p for p in psutil.Process(worker.process.pid).children(recursive=True)
            if "warm_interpreter" in " ".join(p.cmdline())]


def test_a_lost_warm_worker_loses_and_repeats_nothing(prefect_server, start_worker, records, tmp_path):
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        # Round 1: two runs mid-body in the interpreters when the worker dies.
        first = start_worker("warm", slots=2, env={"TASKSERVER_WARM_PRELOAD": "flows"})
        running = create_runs("probe/normal-warm", [probe_params(f"run{i}", records, 45) for i in range(2)])
        wait_for(lambda: len(read_starts(records)) == 2, 300, "both runs to be in their bodies", interval=0.3)
        wait_for_heartbeats(running)  # the zombie automation now watches them
        interpreters = _interpreters(first)
        assert len(interpreters) == 2
        os_pid = first.process.pid
        kill_like_a_lost_node(first)
        assert not psutil.pid_exists(os_pid)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in interpreters)

        # Round 2: a worker killed while its interpreters load (model and unstructured: seconds),
        # with two runs it already took (Pending, waiting for an interpreter).
        second = start_worker("warm", slots=2, env={"TASKSERVER_WARM_PRELOAD": "encoder,pdf,flows"})
        pending = create_runs("probe/high-warm", [probe_params(f"pending{i}", records, 0) for i in range(2)])
        wait_for(lambda: set(state_types(pending).values()) == {"PENDING"}, 120, "both runs to be Pending",
                 interval=0.2)
        kill_like_a_lost_node(second)
        assert not any(label.startswith("pending") for label in read_starts(records))

        recovery = RecoveryService(prefect_server.api_url, tmp_path / "recovery.log").start()
        try:
            everyone = running + pending
            wait_for(lambda: set(state_types(everyone).values()) == {"SCHEDULED"}, 400,
                     "every lost run to be back in its queue", interval=2)
            third = start_worker("warm", slots=2, env={"TASKSERVER_WARM_PRELOAD": "flows"})
            wait_for(lambda: set(state_types(everyone).values()) == {"COMPLETED"}, 300,
                     "every run to complete on the next warm worker", interval=1)
            assert third.process.poll() is None
        finally:
            recovery.stop()

        runs = read_runs(everyone)
        for run_id in running:
            record = runs[run_id]
            assert record.count("COMPLETED") == 1 and record.count("CRASHED") == 1, record.history
            assert record.messages("CRASHED") == [ZOMBIE_MESSAGE]
        for run_id in pending:
            record = runs[run_id]
            assert record.count("COMPLETED") == 1 and record.count("CRASHED") == 0, record.history
            assert any("stranded Pending" in m for m in record.messages("SCHEDULED")), record.history

        starts = read_starts(records)
        # The killed bodies ran once before the kill and once after; the Pending runs' only once.
        assert sorted(len(starts[f"run{i}"]) for i in range(2)) == [2, 2]
        assert [len(starts[f"pending{i}"]) for i in range(2)] == [1, 1]
        done = read_done(records)
        assert sorted(done) == ["pending0", "pending1", "run0", "run1"]
        for label, run_id in zip(["run0", "run1", "pending0", "pending1"], everyone):
            assert done[label]["flow_run_id"] == str(run_id)
