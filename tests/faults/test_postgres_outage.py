"""Postgres goes away for 30 s under a real Prefect server and a real worker: nothing is lost.

Runs are queued and one is running when the database stops; a submission is made while it is
down and another after it is back. Nobody restarts the server or the worker. Every run must end
Completed exactly once: one probe start line per label and one Completed flow run per label.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path

import pytest

from platform_support import (
    BIN, PrefectServer, WorkerProcess, base_env, probe_params, read_done, read_starts, wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

OUTAGE_SECONDS = 30

CLIENT_RETRY_ENV = {"PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}
"""What every Prefect client of the stack (workers, hence flow-run processes, and the CLI) needs.

Prefect 3.8.8's server answers 503 (which clients retry, with back-off, ~62 s in all) only for
errors it classes as retryable. With Postgres down, asyncpg's connect raises a bare
``ConnectionRefusedError`` that SQLAlchemy does not wrap in ``DBAPIError``, so
``prefect.server.api.server.is_client_retryable_exception`` returns False and the API answers
500, which clients do not retry. Without this setting a run ending during the outage fails to
report Completed ("Failed to update state of flow run") and stays Running, and a submission
made during the outage fails at once with the 500.
"""


@pytest.fixture
def cluster(postgres_cluster):
    """The embedded PostgreSQL on a loopback port; the test stops it and starts it again."""
    return postgres_cluster


def _submit_cli(api_url: str, label: str, records: Path, seconds: float) -> subprocess.CompletedProcess:
    argv = [str(BIN / "taskserver"), "submit", "probe", "-p", "high"]
    for key, value in probe_params(label, records, seconds).items():
        argv += ["--param", f"{key}={value}"]
    return subprocess.run(argv, env=base_env(PREFECT_API_URL=api_url, **CLIENT_RETRY_ENV), capture_output=True,
                          text=True, timeout=300)


async def _runs_by_label(api_url: str) -> dict[str, list[tuple[str, str]]]:
    from prefect.client.orchestration import get_client

    found: dict[str, list[tuple[str, str]]] = {}
    async with get_client() as client:
        for flow_run in await client.read_flow_runs(limit=200, offset=0):
            label = (flow_run.parameters or {}).get("label")
            found.setdefault(label, []).append((flow_run.state.type.value if flow_run.state else "?",
                                                str(flow_run.id)))
    return found


def test_postgres_outage_of_30s_loses_and_duplicates_nothing(cluster, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from taskserver.platform.bootstrap import bootstrap
    from taskserver.platform.submission import submit
    from taskserver.platform.tasks import DIAGNOSTIC_TASKS

    records = tmp_path / "records"
    records.mkdir()
    server = PrefectServer(tmp_path / "server", cluster.url).start()
    worker = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
            pool = asyncio.run(_pool_of("probe/high"))
            # One slot: one run holds it through the outage, the others wait in the queue.
            worker = WorkerProcess(pool, 1, server.api_url, tmp_path / "worker.log", env=CLIENT_RETRY_ENV).start()
            before = {"before-long": 15.0, "before-1": 1.0, "before-2": 1.0, "before-3": 1.0}
            for label, seconds in before.items():
                submit("probe", "high", probe_params(label, records, seconds))

            wait_until(lambda: "before-long" in read_starts(records), 180, "the long run to start")
            server_pid, worker_pid = server.process.pid, worker.process.pid
            cluster.stop()
            outage_started = time.monotonic()

            during: dict[str, subprocess.CompletedProcess] = {}
            submitter = threading.Thread(
                target=lambda: during.setdefault("result", _submit_cli(server.api_url, "during", records, 1.0)))
            time.sleep(3)
            submitter.start()
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_started)))
            # The long run's body ended while the database was away: its end must still reach the server.
            assert "before-long" in read_done(records)
            cluster.start()

            submitter.join(timeout=240)
            assert not submitter.is_alive(), "a submission made during the outage never returned"
            result = during["result"]
            assert result.returncode == 0, result.stdout + result.stderr
            submit("probe", "high", probe_params("after", records, 1.0))

            labels = [*before, "during", "after"]
            wait_until(lambda: set(labels) <= set(read_done(records)), 300,
                       f"every run to finish: {labels} (see {tmp_path / 'worker.log'})")

            def settled():
                runs = asyncio.run(_runs_by_label(server.api_url))
                return runs if all(s == "COMPLETED" for label in labels for s, _ in runs.get(label, [])) else None

            runs = wait_until(settled, 120, "every run to be Completed on the server")
            assert {label: [s for s, _ in runs[label]] for label in labels} == {label: ["COMPLETED"] for label in labels}
            starts = read_starts(records)
            assert {label: len(starts[label]) for label in labels} == {label: 1 for label in labels}

            # Recovered by themselves: the very same processes, still serving.
            assert server.process.pid == server_pid and server.process.poll() is None
            assert worker.process.pid == worker_pid and worker.process.poll() is None
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


async def _pool_of(deployment: str) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_deployment_by_name(deployment)).work_pool_name


def test_local_stack_gives_its_workers_the_outage_tolerant_client_settings(tmp_path):
    from taskserver.platform import localstack

    env = localstack._base_env(localstack.stack_paths(tmp_path))
    for name, value in CLIENT_RETRY_ENV.items():
        assert value in env.get(name, "").replace(" ", "").split(","), (name, env.get(name))
