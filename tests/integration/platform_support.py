"""Helpers for the platform integration tests: server and worker processes, probe records."""

from __future__ import annotations

from contextlib import contextmanager

import asyncio
import glob
import json
import os
import tempfile
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "TASKSERVER_CODE_DIR": str(REPO), "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess with its own home and database."""

    home: Path
    database_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "ab")
        # Events are stored within 0.5 s (default 5 s), so a test can wait for one to arrive
        # (the fault tests wait for each run's first heartbeat before they kill its worker).
        env = base_env(PREFECT_HOME=str(self.home), PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
                       PREFECT_UI_ENABLED="false", PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="0.5")
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start; see {self.home / 'server.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@dataclass
class WorkerProcess:
    pool: str
    slots: int
    api_url: str
    log: Path
    worker_type: str = "taskserver"
    poll_seconds: str = "1"
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment, e.g. a worker's own home and data location."""
    cwd: Path | None = None

    def start(self) -> "WorkerProcess":
        env = base_env(PREFECT_API_URL=self.api_url, PREFECT_WORKER_QUERY_SECONDS=self.poll_seconds, **self.env)
        name = f"test-{self.pool}-{os.getpid()}-{time.monotonic_ns()}"
        if self.worker_type == "taskserver":
            argv = [sys.executable, "-m", "taskserver.platform.serve", self.pool, str(self.slots), name]
        elif self.worker_type == "warm":  # the warm lane's worker, as `taskserver up` runs it
            argv = [sys.executable, "-m", "taskserver.platform.serve", self.pool, str(self.slots), name]
        else:  # Prefect's stock process worker
            argv = [str(BIN / "prefect"), "worker", "start", "--pool", self.pool, "--type", "process",
                    "--limit", str(self.slots), "--name", name]
        self.process = subprocess.Popen(argv, env=env, stdout=open(self.log, "ab"), cwd=self.cwd,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@dataclass
class RecoveryService:
    """``python -m taskserver.platform.recovery`` as the platform runs it, against one server."""

    api_url: str
    log: Path
    interval: float = 3.0
    max_attempts: int = 3
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def start(self) -> "RecoveryService":
        argv = [sys.executable, "-m", "taskserver.platform.recovery", "--interval", str(self.interval),
                "--max-attempts", str(self.max_attempts), *self.extra_args]
        self.process = subprocess.Popen(argv, env=base_env(PREFECT_API_URL=self.api_url),
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def read_starts(record_dir: Path) -> dict[str, list[dict]]:
    """Every body start the probe recorded, by label."""
    found: dict[str, list[dict]] = {}
    for name in glob.glob(str(record_dir / "*.starts.jsonl")):
        label = Path(name).name.removesuffix(".starts.jsonl")
        found[label] = [json.loads(line) for line in Path(name).read_text().splitlines() if line.strip()]
    return found


def read_done(record_dir: Path) -> dict[str, dict]:
    return {Path(n).stem: json.loads(Path(n).read_text())
            for n in glob.glob(str(record_dir / "*.json"))}


EXAMPLE_PACKAGE = REPO / "examples" / "taskserver-keywords"


def install_example_package(target: Path) -> Path:
    """The example task package, installed by pip (a wheel built from its pyproject) into
    ``target`` alone: only processes given ``PYTHONPATH=target`` see it, the test process not."""
    subprocess.run([str(BIN / "pip"), "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE_PACKAGE)], check=True, capture_output=True, text=True)
    assert (target / "taskserver_keywords" / "flow.py").exists()
    return target


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5, details=None):
    """Poll ``predicate`` until it returns something true; on timeout, fail naming ``what`` and
    adding ``details()`` (a process's log, say) so the failure shows its cause."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    extra = f"\n{details()}" if details is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")


def probe_params(label: str, record_dir: Path, seconds: float = 1.0) -> dict:
    return {"label": label, "record_dir": str(record_dir), "seconds": seconds}


def run(coro):
    return asyncio.run(coro)


async def _delete_unfinished_runs() -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))),
            sort=FlowRunSort.ID_DESC, limit=200, offset=0,
        )
        for flow_run in runs:
            await client.delete_flow_run(flow_run.id)
        return len(runs)


async def count_runs() -> int:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.count_flow_runs()


async def scheduled_labels(deployment_name: str) -> list[str]:
    """Probe labels of the deployment's runs that are still Scheduled (not yet picked up)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(deployment_name)
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.ID_DESC, limit=200, offset=0,
        )
        return [r.parameters["label"] for r in runs]


@contextmanager
def local_postgres():
    """A throwaway PostgreSQL on a loopback port: the local stack's own embedded server
    (``taskserver.platform.local_postgres``), so the tests need no Debian package."""
    from taskserver.platform.local_postgres import LocalPostgres

    # Outside pytest's tmp tree: its paths can pass the 107-byte socket-name limit.
    base = Path(tempfile.mkdtemp(prefix="taskserver-pg-"))
    cluster = LocalPostgres(base / "data", port=free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def prefect_server_on_postgres(home: Path):
    """A Prefect server on its own throwaway PostgreSQL, as `taskserver up` and the chart run it
    (on SQLite the warm lane's fast polls beside a busy suite made the server answer 503)."""
    with local_postgres() as cluster:
        server = PrefectServer(home, cluster.url).start()
        try:
            yield server
        finally:
            server.stop()
