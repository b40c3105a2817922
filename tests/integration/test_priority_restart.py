"""A server restart on Postgres while runs are queued: no run is lost, none runs twice.

The recovery service runs, as in every stack: a run whose process was starting while the API was
gone exits before its body (its engine's calls fail once the client's retries are spent, on a
loaded machine) and is Crashed; recovery puts it back, and its body still runs exactly once."""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from taskserver.platform.bootstrap import bootstrap
from taskserver.platform.submission import status, submit
from taskserver.platform.tasks import DIAGNOSTIC_TASKS

from platform_support import (
    PrefectServer,
    RecoveryService,
    WorkerProcess,
    probe_params,
    read_done,
    read_starts,
    wait_until,
)


@pytest.mark.slow
def test_restarting_the_server_with_runs_queued_loses_and_repeats_nothing(postgres_url, tmp_path, records):
    server = PrefectServer(tmp_path / "server", postgres_url).start()
    worker = None
    recovery = RecoveryService(server.api_url, tmp_path / "recovery.log")
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
            labels = [f"r{i}" for i in range(6)]
            run_ids = {label: submit("probe", "normal", probe_params(label, records, seconds=1.0)) for label in labels}
            recovery.start()
            worker = WorkerProcess("cpu", 2, server.api_url, tmp_path / "worker.log").start()
            wait_until(lambda: len(read_starts(records)) >= 1, timeout=120, what="the first run to start")

            server.stop()  # runs are queued and running while the API is gone
            server.start()

            wait_until(lambda: len(read_done(records)) == len(labels), timeout=300, what="every run to finish")
            starts = read_starts(records)
            assert {label: len(starts[label]) for label in labels} == {label: 1 for label in labels}
            for label, run_id in run_ids.items():
                assert read_done(records)[label]["flow_run_id"] == str(run_id)
            wait_until(lambda: all(status(r).state_type == "COMPLETED" for r in run_ids.values()),
                       timeout=60, what="every run to be Completed on the server")
    finally:
        recovery.stop()
        if worker is not None:
            worker.stop()
        server.stop()
