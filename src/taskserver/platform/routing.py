"""Which lane a submitted run goes to: the warm lane for small inputs, Jobs for the rest.

A warm-capable task (encode, infer, process-pdfs) defaults to the warm lane; a run whose inputs
are large would hold a warm interpreter (and its memory) for long, so it goes to its Job
instead. "Large" is measured on the task's data parameters (``TaskType.data_parameters``, not
its model or output paths): their inline JSON size plus the size of every local file or
directory they point to. A submitter can always
name the lane. ``prefect deployment run`` bypasses this and uses the deployment it names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from taskserver.errors import ParameterError
from taskserver.platform.priorities import get_priority
from taskserver.platform.tasks import JOB_LANE, LANES, WARM_LANE, TaskType, get_task

WARM_INPUT_LIMIT_BYTES = 8 * 1024 * 1024
"""Above this much input a warm-default task runs on its Job: ~8 MB is ~20k short texts or a
few dozen PDF pages, tens of seconds of work, where a process start no longer matters."""
AUTO = "auto"


def lane_deployment(task: TaskType, priority: str, lane: str) -> str:
    """A deployment's own name: ``<priority>`` on the task's default lane, ``<priority>-<lane>``
    otherwise. The one definition of the naming: the generator and the submitters use it."""
    level = get_priority(priority)
    return level.name if lane == task.default_lane else f"{level.name}-{lane}"


def deployment_name(task: TaskType, priority: str, lane: str | None = None) -> str:
    """``<flow>/<priority>`` on the task's default lane (also for ``lane=None``),
    ``<flow>/<priority>-<lane>`` otherwise."""
    return f"{task.name}/{lane_deployment(task, priority, lane or task.default_lane)}"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _local_size(text: str, data_dir: str | None) -> int:
    if not text or len(text) > 4096 or "\n" in text or "://" in text:
        return 0
    candidates = [Path(text)]
    if data_dir and not os.path.isabs(text):
        candidates.append(Path(data_dir) / text)
    for path in candidates:
        try:
            if path.is_file():
                return path.stat().st_size
            if path.is_dir():
                return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        except OSError:
            continue
    return 0


def input_bytes(parameters: dict[str, Any], data_dir: str | None = None,
                names: tuple[str, ...] | None = None) -> int:
    """Inline payload plus the local files the parameters point to (object-store URLs count 0).

    ``names``: only these parameters (a task's data parameters); None: all of them.
    """
    if names is not None:
        parameters = {k: v for k, v in parameters.items() if k in names}
    inline = len(json.dumps(parameters, default=str))
    return inline + sum(_local_size(text, data_dir) for text in _strings(parameters))


def choose_lane(task: TaskType | str, parameters: dict[str, Any], lane: str | None = None,
                data_dir: str | None = None) -> str:
    """The lane for this run: the one asked for, else by the task's default and the input size."""
    task = get_task(task) if isinstance(task, str) else task
    if lane not in (None, AUTO):
        if lane not in LANES:
            raise ParameterError.not_in(f"lane {lane!r}", "unknown lane", [*LANES, AUTO])
        if lane not in task.lanes:
            raise ParameterError(
                f"lane {lane!r} for task {task.name!r}", "this task only runs on Jobs",
                f"its lanes: {', '.join(task.lanes)}",
            )
        return lane
    if task.default_lane != WARM_LANE:
        return task.default_lane
    if input_bytes(parameters, data_dir, task.data_parameters) > WARM_INPUT_LIMIT_BYTES:
        return JOB_LANE
    return WARM_LANE
