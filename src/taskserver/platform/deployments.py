"""Deployments generated from the task catalogue and the priority model.

Every task gets one deployment per priority, named ``<flow>/<priority>``, on its default lane
and in the priority's work queue. A warm-capable task also gets ``<flow>/<priority>-job`` or
``<flow>/<priority>-warm`` on its other lane, which is how a submitter overrides the routing. ``prefect.yaml`` and the bootstrap are both built from
``deployment_specs()``, so neither can drift from ``priorities.py`` and ``tasks.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from taskserver.flows.heartbeats import HEARTBEAT_SECONDS, RUN_HEARTBEAT_ENV
from taskserver.platform.priorities import PRIORITIES, PriorityLevel
from taskserver.platform.routing import deployment_name, lane_deployment
from taskserver.platform.tasks import JOB_LANE, LANE_DESCRIPTIONS, Pool, TaskType, catalogue, get_task
from taskserver.settings import env_name, get_settings

STEP_DEPLOYMENTS_ENV = env_name("step_deployments")

PREFECT_YAML = "prefect.yaml"

ZOMBIE_WINDOW_SECONDS = 3 * HEARTBEAT_SECONDS
"""No heartbeat (or other event) from a Running run for this long: the zombie automation crashes it."""

# The only schedule shipped: a nightly retrain, off until someone turns it on.
NIGHTLY_RETRAIN_TASK = "train"
NIGHTLY_RETRAIN_PRIORITY = PRIORITIES[-1].name  # the lowest level: batch work
NIGHTLY_RETRAIN_CRON = "0 2 * * *"

CODE_DIR_ENV = env_name("code_dir")


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str
    timezone: str = "UTC"
    active: bool = False


@dataclass(frozen=True)
class DeploymentSpec:
    task: TaskType
    priority: PriorityLevel
    schedules: tuple[ScheduleSpec, ...] = field(default=())
    lane: str = JOB_LANE

    @property
    def flow_name(self) -> str:
        return self.task.name

    @property
    def name(self) -> str:
        return lane_deployment(self.task, self.priority.name, self.lane)

    @property
    def full_name(self) -> str:
        return deployment_name(self.task, self.priority.name, self.lane)

    @property
    def pool(self) -> Pool:
        return self.task.pool_for(self.lane)

    @property
    def work_queue_name(self) -> str:
        return self.priority.work_queue

    @property
    def tags(self) -> list[str]:
        return [self.task.name, f"priority:{self.priority.name}", f"pool:{self.pool.name}",
                f"lane:{self.lane}"]

    @property
    def description(self) -> str:
        """Flow, priority, lane, and how to choose another priority: one sentence each.

        The priority is the deployment's (its queue, ``priority:`` tag and PriorityClass come
        together); the queue under the UI's "Additional Options" moves a run without them.
        """
        others = ", ".join(deployment_name(self.task, level.name, self.lane)
                           for level in PRIORITIES if level != self.priority)
        return (
            f"{self.flow_name}: {self.task.description} "
            f"Priority {self.priority.name} (queue {self.work_queue_name}): {self.priority.description} "
            f"{self.lane.capitalize()} lane (pool {self.pool.name}): {LANE_DESCRIPTIONS[self.lane]}. "
            f"For another priority run its deployment ({others}), not this one on another work queue."
        )

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.task.deployment_parameters)

    @property
    def job_variables(self) -> dict[str, Any]:
        if self.lane != JOB_LANE:
            # The warm worker emits the heartbeats of the runs it executes itself (a run's own
            # heartbeat thread costs ~1 s per run at exit) and has no pods to prioritise.
            return {}
        # Heartbeats from the flows' own hooks (taskserver.flows.heartbeats), not the engine's
        # thread, which costs ~1 s at the end of every run.
        env = {RUN_HEARTBEAT_ENV: str(HEARTBEAT_SECONDS)}
        if self.task.steps:
            # A pipeline's steps run at its own priority, each on its Job (batch-sized work).
            env[STEP_DEPLOYMENTS_ENV] = json.dumps(
                {step: deployment_name(get_task(step), self.priority.name, JOB_LANE) for step in self.task.steps},
                sort_keys=True,
            )
        # priority_class_name is read by the Kubernetes base job template; process pools ignore it.
        return {"priority_class_name": self.priority.priority_class_name, "env": env}


def deployment_specs(tasks: tuple[TaskType, ...] | list[TaskType] | None = None) -> list[DeploymentSpec]:
    """One spec per task, lane and priority: catalogue order, default lane first, then priority.
    ``None``: the installed catalogue."""
    specs = []
    for task in catalogue().tasks if tasks is None else tasks:
        for lane in task.lanes:
            for level in PRIORITIES:
                schedules: tuple[ScheduleSpec, ...] = ()
                if (task.name == NIGHTLY_RETRAIN_TASK and level.name == NIGHTLY_RETRAIN_PRIORITY
                        and lane == task.default_lane):
                    schedules = (ScheduleSpec(NIGHTLY_RETRAIN_CRON, active=False),)
                specs.append(DeploymentSpec(task, level, schedules, lane))
    return specs


def code_dir() -> Path:
    """Where the entrypoints (``src/taskserver/flows/...``) resolve from.

    ``TASKSERVER_CODE_DIR`` wins; otherwise the checkout this package was installed from
    (editable installs and images that copy the repository), else the current directory.
    """
    if configured := get_settings().code_dir:
        return Path(configured).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "src" / "taskserver" / "__init__.py").exists():
            return parent
    return Path.cwd().resolve()


def pull_steps(directory: str) -> list[dict[str, Any]]:
    return [{"prefect.deployments.steps.set_working_directory": {"directory": directory}}]


def prefect_yaml_document() -> dict[str, Any]:
    """The content of ``prefect.yaml``: offline build/push, and every generated deployment."""
    deployments = []
    for spec in deployment_specs():
        entry: dict[str, Any] = {
            "name": spec.name,
            "flow_name": spec.flow_name,
            "entrypoint": spec.task.entrypoint,
            "description": spec.description,
            "tags": spec.tags,
            "parameters": spec.parameters,
            "enforce_parameter_schema": True,
            "work_pool": {
                "name": spec.pool.name,
                "work_queue_name": spec.work_queue_name,
                "job_variables": spec.job_variables,
            },
        }
        if spec.schedules:
            entry["schedules"] = [
                {"cron": s.cron, "timezone": s.timezone, "active": s.active} for s in spec.schedules
            ]
        deployments.append(entry)
    return {
        "name": "taskserver",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        # Resolved when `prefect deploy` runs: run it from the repository root, or set
        # TASKSERVER_CODE_DIR to where the code lives on the workers (the image's WORKDIR).
        "pull": pull_steps("{{ $" + CODE_DIR_ENV + " }}"),
        "deployments": deployments,
    }


HEADER = (
    "# GENERATED by `python -m taskserver.platform.deployments` from platform/priorities.py and\n"
    "# platform/tasks.py. Do not edit by hand: change the model and regenerate.\n"
    "# Deploy offline with: TASKSERVER_CODE_DIR=$PWD prefect --no-prompt deploy --all\n"
    "# (or `taskserver bootstrap`, which also creates pools, queues and automations).\n"
)


def render_prefect_yaml() -> str:
    body = yaml.safe_dump(prefect_yaml_document(), sort_keys=False, width=100)
    return HEADER + body


def write_prefect_yaml(path: Path | None = None) -> Path:
    target = path or (code_dir() / PREFECT_YAML)
    target.write_text(render_prefect_yaml())
    return target


if __name__ == "__main__":
    print(write_prefect_yaml())
