"""Security basics of the local stack: loopback only, basic auth when configured, no secret in logs.

One real `taskserver up` (Postgres, auth, a notification webhook) serves all three checks; it is
stopped with `taskserver down` whatever happens.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from platform_support import BIN, base_env, free_port, local_postgres

AUTH = "taskadmin:AuthSecret789xyz"
DB_PASSWORD = "PgSecret123xyz"
HOOK_TOKEN = "HookToken456xyz"
SECRETS = (AUTH.split(":", 1)[1], DB_PASSWORD, HOOK_TOKEN)

pytestmark = pytest.mark.slow


def _cli(home: Path, env_extra: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = base_env(TASKSERVER_HOME=str(home), **env_extra)
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "TASKSERVER_AUTH_STRING"):
        if name not in env_extra:
            env.pop(name, None)
    return subprocess.run([str(BIN / "taskserver"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _request(url: str, body: dict | None = None, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    return [conn.laddr.ip for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port]


def _own_non_loopback_ipv4() -> list[str]:
    """This machine's own interface addresses (connecting to them never leaves the machine)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in out.split() if "." in a and not a.startswith("127.")]


@pytest.fixture(scope="module")
def module_postgres():
    """One throwaway PostgreSQL for the module's one stack."""
    with local_postgres() as cluster:
        yield cluster.url


@pytest.fixture(scope="module")
def secured_stack(tmp_path_factory, module_postgres):
    """`taskserver up` with auth, a Postgres URL holding a password and a webhook URL holding a token.

    One stack for both tests (a stack start is most of their time); the first test leaves one
    Completed run behind, which the second does not count on."""
    tmp_path = tmp_path_factory.mktemp("secured")
    home = tmp_path / "home"
    port = free_port()
    user, rest = module_postgres.split("://", 1)[1].split("@", 1)
    database_url = f"postgresql+asyncpg://{user}:{DB_PASSWORD}@{rest}"  # trust auth: the password is not checked
    hook = f"http://127.0.0.1:{free_port()}/hooks/taskserver?token={HOOK_TOKEN}"  # nothing listens there
    env = {"TASKSERVER_AUTH_STRING": AUTH, "TASKSERVER_NOTIFY_WEBHOOK_URL": hook,
           "TASKSERVER_DATA_DIR": str(tmp_path / "data")}
    outputs: list[str] = []
    try:
        started = _cli(home, env, "up", "--port", str(port), "--with-probe", "--database-url", database_url)
        outputs.append(started.stdout + started.stderr)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"home": home, "port": port, "env": env, "outputs": outputs, "tmp": tmp_path}
    finally:
        stopped = _cli(home, env, "down")
        outputs.append(stopped.stdout + stopped.stderr)


def test_local_stack_listens_on_loopback_only_and_refuses_unauthenticated_requests(secured_stack):
    port = secured_stack["port"]
    api = f"http://127.0.0.1:{port}/api"

    # (a) the API socket is bound to 127.0.0.1, not 0.0.0.0 or ::
    assert _listening_addresses(port) == ["127.0.0.1"]
    for address in _own_non_loopback_ipv4():
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, f"reachable on {address}:{port}"

    # (b) without credentials: 401; wrong ones: 401; right ones: 200. Health stays open for probes.
    assert _request(f"{api}/flow_runs/count", {})[0] == 401
    assert _request(f"{api}/deployments/filter", {"limit": 5})[0] == 401
    assert _request(f"{api}/flow_runs/count", {}, auth="taskadmin:wrong")[0] == 401
    status, body = _request(f"{api}/flow_runs/count", {}, auth=AUTH)
    assert status == 200 and int(body) >= 0
    assert _request(f"{api}/health")[0] == 200

    # The CLI without the credentials is refused before any run exists.
    records = secured_stack["tmp"] / "records"
    runs_before = int(_request(f"{api}/flow_runs/count", {}, auth=AUTH)[1])
    refused = _cli(secured_stack["home"], {}, "submit", "probe", "-p", "high", "--param", "label=nope",
                   "--param", f"record_dir={records}", "--param", "seconds=0")
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Unauthorized" in refused.stdout + refused.stderr
    secured_stack["outputs"].append(refused.stdout + refused.stderr)
    assert int(_request(f"{api}/flow_runs/count", {}, auth=AUTH)[1]) == runs_before

    # With them (TASKSERVER_AUTH_STRING), a run goes through the authenticated workers to Completed.
    done = _cli(secured_stack["home"], secured_stack["env"], "submit", "probe", "-p", "high", "--param", "label=ok",
                "--param", f"record_dir={records}", "--param", "seconds=0", "--wait", "--timeout", "180")
    secured_stack["outputs"].append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "state:      Completed" in done.stdout
    assert json.loads((records / "ok.json").read_text())["label"] == "ok"


def test_no_credential_appears_in_logs_artifacts_or_the_home(secured_stack):
    api = f"http://127.0.0.1:{secured_stack['port']}/api"
    home, env, outputs = secured_stack["home"], secured_stack["env"], secured_stack["outputs"]
    records = secured_stack["tmp"] / "records"

    # A run that completes, and one that fails (which fires the webhook automation).
    ok = _cli(home, env, "submit", "probe", "-p", "high", "--param", "label=a", "--param", f"record_dir={records}",
              "--param", "seconds=0", "--wait", "--timeout", "180")
    outputs.append(ok.stdout + ok.stderr)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A blank text (an empty list would mean "not given": the deployment's sample file runs).
    failed = _cli(home, env, "submit", "encode", "-p", "high", "--param", 'texts=["   "]', "--wait", "--timeout", "240")
    outputs.append(failed.stdout + failed.stderr)
    assert failed.returncode == 1 and "state:      Failed" in failed.stdout, failed.stdout + failed.stderr
    status = _cli(home, env, "status", failed.stdout.splitlines()[0].strip())
    outputs.append(status.stdout + status.stderr)

    logs = _request(f"{api}/logs/filter", {"limit": 200, "offset": 0}, auth=AUTH)
    artifacts = _request(f"{api}/artifacts/filter", {"limit": 200, "offset": 0}, auth=AUTH)
    runs = _request(f"{api}/flow_runs/filter", {"limit": 200, "offset": 0}, auth=AUTH)
    assert logs[0] == artifacts[0] == runs[0] == 200
    assert len(json.loads(logs[1])) > 0 and len(json.loads(runs[1])) >= 2

    places = {"api logs": logs[1], "api artifacts": artifacts[1], "flow runs": runs[1],
              "cli output": "\n".join(outputs).encode()}
    data = secured_stack["tmp"] / "data"  # persisted results
    for path in sorted(p for root in (home, data) for p in root.rglob("*") if p.is_file()):  # logs, pid files, ...
        places[str(path)] = path.read_bytes()
    assert any(name.endswith(".log") for name in places)
    assert any(name.endswith("stack.json") for name in places)
    leaks = [f"{secret!r} in {place}" for place, data in places.items() for secret in SECRETS
             if secret.encode() in data]
    assert leaks == []
    state = json.loads((home / "run" / "stack.json").read_text())
    assert state["database_url"].startswith("postgresql+asyncpg://postgres:***@127.0.0.1:")
