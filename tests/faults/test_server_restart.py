"""The Prefect server restarts (Postgres) with 100 runs queued and some running: all complete, none twice.

A run's body may only run again when the server recorded that its attempt was lost (a Crashed
state the recovery service then rescheduled); every other run starts its body exactly once, and
every run writes its result exactly once.
"""

from __future__ import annotations

import time

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from fault_support import RecoveryService, create_runs, read_runs, wait_for
from platform_support import PrefectServer, WorkerProcess, probe_params, read_done, read_starts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1200)]

RUNS = 100
DOWN_SECONDS = 5.0


def test_server_restart_with_100_runs_queued_completes_all_once(postgres_url, tmp_path, records):
    from taskserver.platform.bootstrap import bootstrap
    from taskserver.platform.tasks import DIAGNOSTIC_TASKS

    server = PrefectServer(tmp_path / "server", postgres_url).start()
    workers: list[WorkerProcess] = []
    recovery = RecoveryService(server.api_url, tmp_path / "recovery.log")
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
            labels = [f"q{i:03d}" for i in range(RUNS)]
            run_ids = dict(zip(labels, create_runs("probe/normal",
                                                   [probe_params(l, records, seconds=0.5) for l in labels])))
            recovery.start()
            workers = [WorkerProcess("cpu", 4, server.api_url, tmp_path / f"worker-{i}.log").start() for i in range(2)]
            wait_for(lambda: len(read_starts(records)) >= 8, timeout=300, what="the first runs to start", interval=0.2)

            running = set(read_starts(records)) - set(read_done(records))
            server.stop()  # 90+ runs queued, a few mid-body
            time.sleep(DOWN_SECONDS)
            server.start()
            assert len(read_done(records)) < RUNS - 50, "too many runs finished before the restart to test it"

            wait_for(lambda: len(read_done(records)) == RUNS, timeout=900, what="every run to finish", interval=2)
            wait_for(lambda: all(r.state_type == "COMPLETED" for r in read_runs(list(run_ids.values())).values()),
                     timeout=120, what="every run to be Completed on the server")

            history = read_runs(list(run_ids.values()))
            starts, done = read_starts(records), read_done(records)
            repeated = []
            for label, run_id in run_ids.items():
                run = history[run_id]
                assert done[label]["flow_run_id"] == str(run_id)
                assert run.count("COMPLETED") == 1, f"{label}: {run.history}"
                crashes = run.messages("CRASHED")
                # A body runs again only after the server recorded its attempt as lost and the
                # recovery service rescheduled it; otherwise exactly one start.
                assert 1 <= len(starts[label]) <= run.run_count, (label, starts[label], run.history)
                assert len(starts[label]) - 1 <= len(crashes), (label, starts[label], run.history)
                reschedules = [m for _, name, m in run.history if name == "AwaitingRetry"]
                assert len(reschedules) == len(crashes), run.history
                if len(starts[label]) > 1:
                    repeated.append(label)
            print(f"runs mid-body at the restart: {len(running)}; started again after a recorded crash: {repeated}")
    finally:
        recovery.stop()
        for worker in workers:
            worker.stop()
        server.stop()
