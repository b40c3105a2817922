"""One warm interpreter of the warm lane: loads Prefect and the libraries once, then runs the
flow runs its worker sends, one at a time, with Prefect's own engine.

Protocol (one JSON object per line): the worker writes ``{"op": "run", "flow_run_id", "env"}``
or ``{"op": "exit"}`` to stdin; this process answers on its original stdout with ``ready`` once
warm and ``finished`` after each run. The flows' own prints go to stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator
from uuid import UUID

PRELOADS = ("encoder", "pdf", "flows")


def _die_with_parent() -> None:
    """If the worker is killed, its interpreters must not outlive it (like a pod's processes).

    The parent-death signal only covers a worker that dies after ``prctl``; one that died before
    is caught by comparing the parent with the pid the worker wrote. Not by ``getppid() == 1``:
    in a container the worker itself is pid 1.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the worker's stop() still ends us
        pass
    from taskserver.platform.warm import WORKER_PID_ENV  # the worker's module: this one runs under it

    expected = os.environ.get(WORKER_PID_ENV)
    if expected and os.getppid() != int(expected):
        print(f"warm interpreter: the worker (pid {expected}) is gone; exiting", file=sys.stderr)
        os._exit(1)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def preload(names: list[str]) -> None:
    """Load what the warm lane's runs need, so their first run is as fast as the hundredth."""
    import prefect.flow_engine  # noqa: F401
    import prefect.flows  # noqa: F401

    import taskserver.platform.warm  # noqa: F401  (the heartbeat hook's module)

    unknown = sorted(set(names) - set(PRELOADS))
    if unknown:
        print(f"warm interpreter: ignoring unknown preloads {unknown}; known: {list(PRELOADS)}",
              file=sys.stderr)
    if "encoder" in names:
        from taskserver import encoding

        encoding.get_encoder()
    if "pdf" in names:
        from taskserver import documents

        documents.prepare_unstructured()
    if "flows" in names:
        preload_flows()


def preload_flows() -> list[str]:
    """Import the flow module of every warm-capable task in the installed catalogue (taskserver's
    and every registered package's) and the diagnostic probe; return the modules imported.

    A module that fails here is reported and skipped: its runs then fail on their own, with the
    import error in their logs, while every other task's runs stay warm. The bootstrap refuses a
    package whose warm-capable module does not import in this environment, so this is rare.
    """
    import importlib

    from taskserver.platform.tasks import DIAGNOSTIC_TASKS, catalogue

    loaded = []
    for module in dict.fromkeys(t.module for t in (*catalogue().tasks, *DIAGNOSTIC_TASKS) if t.warm_capable):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - one broken package must not take the lane down
            print(f"warm interpreter: could not preload {module}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        loaded.append(module)
    print(f"warm interpreter: preloaded flows: {', '.join(loaded)}", file=sys.stderr)
    return loaded


@contextmanager
def run_environment(env: dict[str, str | None]) -> Iterator[None]:
    """Apply a run's job environment around it, then restore the interpreter's.

    ``PREFECT_*`` settings are not applied: Prefect reads them once per process, so on this
    lane they come from the worker's environment. ``get_settings()`` follows the environment,
    so the run's settings apply for exactly its duration.
    """
    applied = {k: v for k, v in env.items() if not k.startswith("PREFECT_")}
    saved = {k: os.environ.get(k) for k in applied}
    for key, value in applied.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FlowLoader:
    """Flows loaded once per deployment: pull steps and the entrypoint import run on first use."""

    def __init__(self) -> None:
        self._flows: dict[UUID, Any] = {}

    def load(self, flow_run: Any) -> Any:
        from prefect.flows import load_flow_from_flow_run
        from prefect.utilities.asyncutils import run_coro_as_sync

        key = flow_run.deployment_id
        if key is None or key not in self._flows:
            flow = run_coro_as_sync(load_flow_from_flow_run(flow_run, use_placeholder_flow=False))
            flow = flow.with_options(on_running=[*flow.on_running_hooks, _first_heartbeat])
            if key is None:
                return flow
            self._flows[key] = flow
        return self._flows[key]


def _first_heartbeat(flow: Any, flow_run: Any, state: Any) -> None:
    """Arms the zombie automation as soon as the run is Running; the worker sends the rest."""
    from taskserver.flows.heartbeats import emit_run_heartbeat

    emit_run_heartbeat(flow_run)


def execute(flow_run_id: UUID, env: dict[str, str | None], loader: FlowLoader) -> str:
    """Run one flow run to a final state with Prefect's engine; return the state's type."""
    from prefect.exceptions import Abort, Pause
    from prefect.flow_engine import load_flow_run, run_flow
    from prefect.logging.loggers import flow_run_logger

    with run_environment({**env, "PREFECT__FLOW_RUN_ID": str(flow_run_id)}):
        flow_run = load_flow_run(flow_run_id)
        logger = flow_run_logger(flow_run=flow_run)
        try:
            flow = loader.load(flow_run)
        except Exception:
            logger.error("Unexpected exception encountered when trying to load flow", exc_info=True)
            _fail(flow_run_id, "could not load the flow")
            return "FAILED"
        try:
            state = run_flow(flow, flow_run=flow_run, error_logger=logger, return_type="state")
        except (Abort, Pause) as exc:  # the orchestrator said no: nothing ran
            logger.info(f"Flow run {flow_run_id} not run here: {type(exc).__name__}: {exc}")
            return type(exc).__name__.upper()
        return getattr(getattr(state, "type", None), "value", "UNKNOWN")


def _fail(flow_run_id: UUID, message: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Failed(message=message), force=True)


def serve(commands: IO[str], replies: IO[str]) -> int:
    def reply(**message: Any) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    loader = FlowLoader()
    for line in commands:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("op") == "exit":
            break
        if command.get("op") != "run":
            continue
        started = time.perf_counter()
        flow_run_id = UUID(command["flow_run_id"])
        _use_threads(command.get("threads") or 0)
        state = execute(flow_run_id, command.get("env") or {}, loader)
        reply(event="finished", flow_run_id=str(flow_run_id), state=state,
              seconds=time.perf_counter() - started, rss_mb=rss_mb())
    _drain()
    return 0


def _use_threads(threads: int) -> None:
    """This run's share of the cores (the worker decides it from how many runs are in flight)."""
    if threads > 0 and "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _drain() -> None:
    """Deliver the logs and events still buffered before the interpreter goes away."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()
        EventsWorker.drain_all(timeout=10)
    except Exception:
        pass


def main() -> int:
    _die_with_parent()
    # Replies go to the original stdout; everything the flows print goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    started = time.perf_counter()
    from taskserver.flows.heartbeats import without_engine_heartbeats
    from taskserver.settings import get_settings

    preload(get_settings().warm_preload)
    replies.write(json.dumps({"event": "ready", "pid": os.getpid(), "rss_mb": rss_mb(),
                              "seconds": time.perf_counter() - started}) + "\n")
    replies.flush()
    with without_engine_heartbeats():
        return serve(sys.stdin, replies)


if __name__ == "__main__":
    sys.exit(main())
