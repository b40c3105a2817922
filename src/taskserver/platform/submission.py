"""Submit work to a priority queue and read back its status: thin layers over the Prefect client.

Everything is checked before a run exists: the priority against the model, the task against the
server's deployments and the catalogue, and the parameters against the deployment's schema.
``prefect deployment run '<task>/<priority>'`` reaches the same deployments.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import jsonschema
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import Deployment
from prefect.exceptions import ObjectNotFound

from taskserver.errors import ParameterError
from taskserver.platform.priorities import DEFAULT_PRIORITY, get_priority
from taskserver.platform.routing import choose_lane, deployment_name
from taskserver.platform.tasks import DIAGNOSTIC_TASKS, TaskType, catalogue, get_task, task_names
from taskserver.settings import get_settings

FINAL_STATE_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def parse_params(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` items to a dict; a value is JSON when it parses as JSON, else the plain string."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--param {item!r}", "expected KEY=VALUE")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def validate_parameters(parameters: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    """Refuse parameters the flow would refuse: unknown names, missing ones, wrong types."""
    properties = schema.get("properties") or {}
    unknown = sorted(set(parameters) - set(properties))
    if unknown:
        raise ParameterError(
            f"{where} parameter(s) {', '.join(unknown)}", "not a parameter of this flow",
            f"known parameters: {', '.join(properties) or 'none'}",
        )
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(parameters), key=lambda e: list(e.path)
    )
    if errors:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.path) or 'parameters'}: {e.message}" for e in errors
        )
        raise ParameterError(f"{where} parameters", problems)


def _task_type(name: str) -> TaskType:
    """A catalogue task, or a diagnostic one (probe); else "unknown task" with the choices."""
    for task in (*catalogue().tasks, *DIAGNOSTIC_TASKS):
        if task.name == name:
            return task
    return get_task(name)


async def resolve_deployment(client: PrefectClient, task: str, priority: str,
                             lane: str | None = None) -> Deployment:
    level = get_priority(priority)
    name = deployment_name(_task_type(task), level.name, lane)
    try:
        return await client.read_deployment_by_name(name)
    except ObjectNotFound:
        if task not in task_names():
            get_task(task)  # raises "unknown task" with the catalogue's choices
        raise ParameterError(
            f"deployment {name!r}", "not found on the Prefect server",
            "run `taskserver bootstrap` (or `taskserver up`) first",
        ) from None


async def submit_async(
    task: str,
    priority: str = DEFAULT_PRIORITY,
    parameters: dict[str, Any] | None = None,
    wait: bool = False,
    timeout: float | None = None,
    client: PrefectClient | None = None,
    lane: str | None = None,
) -> UUID:
    """Create a run of ``task`` at ``priority`` and return its id (after it finishes, if ``wait``).

    ``lane``: ``warm``, ``job``, or ``None``/``auto`` to route by the task's default and the
    input size (taskserver.platform.routing).
    """
    if client is None:
        async with get_client() as owned:
            return await submit_async(task, priority, parameters, wait, timeout, owned, lane)
    parameters = dict(parameters or {})
    get_priority(priority)
    lane = choose_lane(_task_type(task), parameters, lane, get_settings().data_location)
    deployment = await resolve_deployment(client, task, priority, lane)
    validate_parameters(parameters, deployment.parameter_openapi_schema or {}, f"{task}/{priority}")
    run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    if wait:
        await wait_for_async(run.id, timeout=timeout, client=client)
    return run.id


def submit(
    task: str,
    priority: str = DEFAULT_PRIORITY,
    parameters: dict[str, Any] | None = None,
    wait: bool = False,
    timeout: float | None = None,
    lane: str | None = None,
) -> UUID:
    return asyncio.run(submit_async(task, priority, parameters, wait, timeout, lane=lane))


@dataclass(frozen=True)
class RunStatus:
    id: UUID
    name: str
    deployment: str | None
    state: str
    state_type: str
    message: str | None
    work_pool: str | None
    work_queue: str | None
    created: datetime | None
    expected_start: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    run_seconds: float

    @property
    def is_final(self) -> bool:
        return self.state_type in FINAL_STATE_TYPES

    def lines(self) -> list[str]:
        return [
            f"run:        {self.name} ({self.id})",
            f"deployment: {self.deployment or '-'}",
            f"state:      {self.state}" + (f" - {self.message}" if self.message else ""),
            f"queue:      {self.work_pool or '-'}/{self.work_queue or '-'}",
            f"created:    {self.created or '-'}",
            f"expected:   {self.expected_start or '-'}",
            f"started:    {self.start_time or '-'}",
            f"ended:      {self.end_time or '-'}",
            f"run time:   {self.run_seconds:.1f}s",
        ]


async def status_async(run_id: UUID | str, client: PrefectClient | None = None) -> RunStatus:
    if client is None:
        async with get_client() as owned:
            return await status_async(run_id, owned)
    try:
        run_uuid = UUID(str(run_id))
    except ValueError:
        raise ParameterError(f"run id {run_id!r}", "not a flow run id (a UUID)") from None
    try:
        run = await client.read_flow_run(run_uuid)
    except ObjectNotFound:
        raise ParameterError(f"run id {run_id}", "no such flow run on this server") from None
    deployment = None
    if run.deployment_id:
        try:
            dep = await client.read_deployment(run.deployment_id)
            flow = await client.read_flow(dep.flow_id)
            deployment = f"{flow.name}/{dep.name}"
        except ObjectNotFound:
            deployment = str(run.deployment_id)
    state = run.state
    return RunStatus(
        id=run.id,
        name=run.name,
        deployment=deployment,
        state=state.name if state else "unknown",
        state_type=state.type.value if state else "UNKNOWN",
        message=state.message if state else None,
        work_pool=run.work_pool_name,
        work_queue=run.work_queue_name,
        created=run.created,
        expected_start=run.expected_start_time,
        start_time=run.start_time,
        end_time=run.end_time,
        run_seconds=run.total_run_time.total_seconds(),
    )


def status(run_id: UUID | str) -> RunStatus:
    return asyncio.run(status_async(run_id))


async def wait_for_async(
    run_id: UUID, timeout: float | None = None, client: PrefectClient | None = None, poll: float = 0.5
) -> RunStatus:
    """Poll until the run reaches a final state; ``TimeoutError`` after ``timeout`` seconds."""
    if client is None:
        async with get_client() as owned:
            return await wait_for_async(run_id, timeout, owned, poll)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        current = await status_async(run_id, client)
        if current.is_final:
            return current
        if deadline is not None and loop.time() > deadline:
            raise TimeoutError(f"flow run {run_id} still {current.state} after {timeout}s")
        await asyncio.sleep(poll)
