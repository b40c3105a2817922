"""`taskserver up/down`: one command starts a real stack, refuses to trip over itself, and keeps state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import psutil
import pytest

from taskserver.platform.localstack import IDLE_SERVICE_LOOPS
from platform_support import BIN, base_env, free_port


def _cli(home, *args, timeout=240, **extra_env):
    env = base_env(TASKSERVER_HOME=str(home), **extra_env)
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(BIN / "taskserver"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_up_submit_down_up_keeps_state_and_refuses_conflicts(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    try:
        started = _cli(home, "up", "--port", str(port), "--with-probe",
                       PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS="17")
        assert started.returncode == 0, started.stdout + started.stderr
        # The server's slow idle loops, except where the environment already chose a value.
        server_env = psutil.Process(json.loads((home / "run" / "server.pid").read_text())["pid"]).environ()
        expected = dict(IDLE_SERVICE_LOOPS, PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS="17")
        assert {name: server_env.get(name) for name in expected} == expected
        assert f"Prefect UI: http://127.0.0.1:{port}" in started.stdout
        # The default database: the embedded PostgreSQL, its data under the home.
        assert f"PostgreSQL started: data in {home / 'postgres'}" in started.stdout
        assert json.loads((home / "run" / "stack.json").read_text())["database_url"].startswith("postgresql+asyncpg://")

        again = _cli(home, "up", "--port", str(port))
        assert again.returncode == 2 and "already running" in again.stderr

        submitted = _cli(home, "submit", "probe", "-p", "high", "--param", "label=a",
                         "--param", f"record_dir={tmp_path}", "--param", "seconds=0", "--wait", "--timeout", "180")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = submitted.stdout.splitlines()[0].strip()
        assert (tmp_path / "a.json").exists()

        # Half-running: a worker died behind the stack's back.
        worker = json.loads((home / "run" / "worker-cpu.pid").read_text())["pid"]
        os.killpg(worker, signal.SIGKILL)
        half = _cli(home, "up", "--port", str(port))
        assert half.returncode == 2 and "half-running" in half.stderr

        stopped = _cli(home, "down")
        assert stopped.returncode == 0 and "stopped server" in stopped.stdout, stopped.stdout + stopped.stderr
        assert "stopped postgres" in stopped.stdout
        assert not (home / "postgres" / "postmaster.pid").exists()  # a clean shutdown, not a kill
        assert not list((home / "run").glob("*.pid"))

        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            busy = blocker.getsockname()[1]
            taken = _cli(home, "up", "--port", str(busy))
            assert taken.returncode == 2 and f"port {busy}" in taken.stderr

        restarted = _cli(home, "up", "--port", str(port))
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert "already up to date" in restarted.stdout
        shown = _cli(home, "status", run_id)
        assert "state:      Completed" in shown.stdout and "queue:      cpu/high" in shown.stdout
    finally:
        _cli(home, "down")


def test_up_on_sqlite_when_asked_and_a_clear_error_for_an_unknown_database(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    unknown = _cli(home, "up", "--port", str(port), "--database", "oracle")
    assert unknown.returncode == 2 and "--database oracle" in unknown.stderr and "sqlite" in unknown.stderr
    try:
        started = _cli(home, "up", "--port", str(port), "--database", "sqlite")
        assert started.returncode == 0, started.stdout + started.stderr
        assert json.loads((home / "run" / "stack.json").read_text())["database_url"].startswith("sqlite+aiosqlite:")
        assert (home / "prefect.db").exists() and not (home / "postgres").exists()
    finally:
        stopped = _cli(home, "down")
    assert "stopped server" in stopped.stdout and "stopped postgres" not in stopped.stdout
