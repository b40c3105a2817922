"""Real Prefect servers, real priority workers and a throwaway Postgres for the platform tests.

Everything here is a subprocess on 127.0.0.1 started by the fixture and stopped by it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from server_context import use_server  # noqa: E402
from platform_support import (  # noqa: E402
    WorkerProcess, _delete_unfinished_runs, local_postgres, prefect_server_on_postgres, run,
)


@pytest.fixture(scope="session")
def platform_server(tmp_path_factory):
    """A real server on the stack's embedded PostgreSQL, with the platform bootstrapped (process
    pools, probe deployed)."""
    yield from serve_platform(tmp_path_factory)


@pytest.fixture
def prefect_server(platform_server):
    """The platform server, made the client's server for this one test (see ``use_server``)."""
    with use_server(platform_server.api_url):
        yield platform_server


def serve_platform(tmp_path_factory):
    """The body of ``platform_server``, for suites that want it at another scope (tests/faults)."""
    home = tmp_path_factory.mktemp("prefect-server")
    # PostgreSQL: on SQLite the warm lane's 0.25 s polls beside a burst of runs made the server
    # answer "database is locked" and 503, and the warm worker crashed runs it could not label
    # (CI, 2026-12-01).
    with prefect_server_on_postgres(home) as server:
        with use_server(server.api_url):
            from taskserver.platform.bootstrap import bootstrap
            from taskserver.platform.tasks import DIAGNOSTIC_TASKS

            bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
        yield server


@pytest.fixture
def start_worker(prefect_server, tmp_path):
    """Factory: start a worker subprocess for a pool; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(pool: str = "cpu", slots: int = 2, worker_type: str = "taskserver", api_url: str | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None, poll_seconds: str | None = None):
        if pool == "warm" and worker_type == "taskserver":
            worker_type = "warm"
        poll = poll_seconds or ("0.25" if worker_type == "warm" else "1")
        worker = WorkerProcess(pool, slots, api_url or prefect_server.api_url,
                               tmp_path / f"worker-{len(started)}.log", worker_type, poll,
                               env=env or {}, cwd=cwd).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def records(tmp_path) -> Path:
    path = tmp_path / "records"
    path.mkdir()
    return path


# -- Postgres ----------------------------------------------------------------------------------

@pytest.fixture
def postgres_cluster():
    """``local_postgres()`` for one test. A test may stop and start it (``.stop()`` /
    ``.start()``: the outage faults)."""
    with local_postgres() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    return postgres_cluster.url


@pytest.fixture
def clean_queues(prefect_server):
    """Each test starts with empty queues, whatever the previous one left behind."""
    run(_delete_unfinished_runs())
    yield
    run(_delete_unfinished_runs())


