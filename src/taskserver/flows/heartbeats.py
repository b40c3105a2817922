"""Run heartbeats without the engine's heartbeat thread: what arms Prefect's zombie automation.

Prefect's own per-run heartbeat thread (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``) sleeps in 1 s
steps and is joined when the run ends, so every flow run pays up to ~1 s at exit. Runs here
send the same ``prefect.flow-run.heartbeat`` event from hooks instead: ``on_running`` emits the
first one at once (a heartbeat before Running would be answered by the Running event and arm
nothing) and starts a daemon thread that emits one every ``TASKSERVER_RUN_HEARTBEAT_SECONDS``;
any final state stops it, and nothing waits for it at exit. A process that dies stops beating,
which is exactly what the automation needs to see.

On the job lane the deployments set that setting (``platform.deployments``) and the local
process worker runs Prefect's engine under ``without_engine_heartbeats`` (``platform.job_engine``);
on the warm lane it is unset and the warm worker sends the heartbeats of the runs it executes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from prefect import __version__ as prefect_version
from prefect.events import emit_event

from taskserver.settings import env_name, get_settings

HEARTBEAT_SECONDS = 30
"""How often a run heartbeats; the zombie automation waits three of them."""
RUN_HEARTBEAT_ENV = env_name("run_heartbeat_seconds")

_beating: dict[UUID, threading.Event] = {}
_lock = threading.Lock()


def emit_run_heartbeat(flow_run: Any) -> None:
    """The ``prefect.flow-run.heartbeat`` event Prefect's engine would emit for this run."""
    related = []
    if flow_run.flow_id:
        related.append({"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                        "prefect.resource.role": "flow"})
    if flow_run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    for tag in flow_run.tags or []:
        related.append({"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"})
    emit_event(
        event="prefect.flow-run.heartbeat",
        resource={
            "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
            "prefect.resource.name": flow_run.name or "",
            "prefect.version": prefect_version,
        },
        related=related,
    )


def start_heartbeats(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_running`` hook: first heartbeat now, then one every interval until a final state."""
    seconds = get_settings().run_heartbeat_seconds
    if not seconds:
        return
    stop = threading.Event()
    with _lock:
        previous = _beating.pop(flow_run.id, None)
        _beating[flow_run.id] = stop
    if previous is not None:  # a retried run entering Running again
        previous.set()
    emit_run_heartbeat(flow_run)

    def beat() -> None:
        while not stop.wait(seconds):
            emit_run_heartbeat(flow_run)

    threading.Thread(target=beat, name=f"heartbeat-{flow_run.id}", daemon=True).start()


def stop_heartbeats(flow: Any, flow_run: Any, state: Any) -> None:
    """Final-state hook: the run's heartbeat thread ends (and is not waited for)."""
    with _lock:
        stop = _beating.pop(flow_run.id, None)
    if stop is not None:
        stop.set()


def heartbeat_hooks() -> dict[str, list[Any]]:
    """The ``@flow`` keyword arguments that give a flow its heartbeats.

    Only in-process final states stop the thread: a run that crashes or is cancelled ends its
    process (and the thread with it), and an ``on_crashed`` / ``on_cancellation`` hook would make
    Prefect's runner import the flow's code in the worker to run it.
    """
    return {
        "on_running": [start_heartbeats],
        "on_completion": [stop_heartbeats],
        "on_failure": [stop_heartbeats],
    }


@contextmanager
def without_engine_heartbeats() -> Iterator[None]:
    """Prefect settings minus the engine's own per-run heartbeat thread, for every run inside.

    The thread sleeps in 1 s steps and is joined when the run ends, which costs ~1 s per run; the
    environment cannot switch it off (the setting defaults to 180 and has ``ge=30``, and no
    settings source can say None), but a ``SettingsContext`` can.
    """
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    flows = context.settings.flows.model_copy(update={"heartbeat_frequency": None})
    settings = context.settings.model_copy(update={"flows": flows})
    with SettingsContext(profile=context.profile, settings=settings):
        yield
