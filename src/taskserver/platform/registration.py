"""Checks of the installed task types that need their flows: run by the bootstrap before it
creates anything, so a bad registration is refused whole, with a sentence that names the package.

``tasks.load_catalogue`` already refused what it can see from the registrations alone (an entry
point that does not import, a name clash, an unknown pool). Here, for the tasks of every package
but taskserver (whose own flows the test suite checks): the entrypoint must load a Prefect flow
whose name is the task's; a warm-capable task's module must import in a fresh interpreter with
the warm lane's environment (the warm interpreters import it beside every other flow); its data
parameters must be flow parameters; a request handler it names must load and be a
``RequestHandler``. Warnings: a flow without taskserver's heartbeat hooks (a run lost with its
worker would never be found), and a parameter without a description (the UI's form would show a
bare field).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskserver.errors import ParameterError
from taskserver.flows.heartbeats import start_heartbeats
from taskserver.platform.request_lane.catalogue import load_handler
from taskserver.platform.tasks import OWN_PACKAGE, Catalogue, TaskType, is_module_entrypoint
from taskserver.platform.warm import interpreter_env

WARM_IMPORT_TIMEOUT_SECONDS = 120


@dataclass
class Verification:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolved_entrypoint(task: TaskType, directory: Path) -> str:
    """The entrypoint as Prefect loads it: a module path as is, a file path under ``directory``."""
    if is_module_entrypoint(task.entrypoint):
        return task.entrypoint
    path, _, func = task.entrypoint.rpartition(":")
    return f"{directory / path}:{func}"


def load_flow(task: TaskType, directory: Path) -> Any:
    """The task's flow object: imported from its package, or run from its file under ``directory``."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(resolved_entrypoint(task, directory), use_placeholder_flow=False)


def parameter_schema(task: TaskType, directory: Path) -> dict[str, Any]:
    """The flow's parameter schema, read from its source as the bootstrap deploys it."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    return parameter_schema_from_entrypoint(resolved_entrypoint(task, directory)).model_dump_for_openapi()


def _warm_import_problem(task: TaskType) -> str | None:
    module = task.module
    try:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], env=interpreter_env(),
                              capture_output=True, text=True, timeout=WARM_IMPORT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return f"warm-capable task {task.name!r}: importing {module} took over {WARM_IMPORT_TIMEOUT_SECONDS}s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return (f"warm-capable task {task.name!r}: {module} does not import in a warm interpreter"
                f" (exit {done.returncode}: {last})")
    return None


def _task_problems(task: TaskType, directory: Path, warnings: list[str]) -> list[str]:
    try:
        flow = load_flow(task, directory)
    except Exception as exc:
        return [f"task {task.name!r}: its entrypoint {task.entrypoint} does not load: {type(exc).__name__}: {exc}"]
    name = getattr(flow, "name", None)
    if name is None or not hasattr(flow, "fn"):
        return [f"task {task.name!r}: its entrypoint {task.entrypoint} is a {type(flow).__name__}, not a Prefect flow"]
    problems = []
    if name != task.name:
        problems.append(f"task {task.name!r}: its flow is named {name!r}; the flow's name must be the task's"
                        f" (@flow(name={task.name!r}))")
    properties = parameter_schema(task, directory).get("properties", {})
    unknown = [p for p in task.data_parameters if p not in properties]
    if unknown:
        problems.append(f"task {task.name!r}: data parameters {unknown} are not parameters of its flow")
    if start_heartbeats not in (getattr(flow, "on_running_hooks", None) or []):
        warnings.append(f"task {task.name!r}: its flow sends no run heartbeats, so a run lost with its worker"
                        " (a killed pod or node) is never found and rescheduled; add"
                        " **heartbeat_hooks() from taskserver.flows.heartbeats to its @flow")
    for parameter, schema in properties.items():
        if not schema.get("description"):
            warnings.append(f"task {task.name!r}: parameter {parameter!r} has no description (document it"
                                   " under Args: in the flow's docstring; the UI form shows a bare field)")
    if task.warm_capable and is_module_entrypoint(task.entrypoint):
        problem = _warm_import_problem(task)
        if problem:
            problems.append(problem)
    if task.request_handler:
        try:
            load_handler(task.request_handler)
        except ParameterError as exc:
            problems.append(f"task {task.name!r}: {exc}")
    return problems


def verify(found: Catalogue, directory: Path) -> Verification:
    """Every problem of the installed task types, each naming its package; warnings beside."""
    report = Verification(problems=list(found.problems))
    for task in found.tasks:
        package = found.package_of(task.name)
        if package == OWN_PACKAGE:
            continue
        warnings: list[str] = []
        report.problems += [f"package {package!r}: {p}" for p in _task_problems(task, directory, warnings)]
        report.warnings += [f"package {package!r}: {w}" for w in warnings]
    return report
