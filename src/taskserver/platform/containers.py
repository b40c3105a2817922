"""The local stack's container lane: job-lane runs in containers of the CPU image, on one machine.

``taskserver up --containers`` creates the job-lane pools with the ``taskserver-container``
worker type (``taskserver.platform.container_worker``, Prefect's own Docker worker from
``prefect-docker`` underneath) and points it at a Docker-compatible API: ``DOCKER_HOST`` when
it is set (Docker), else a ``podman system service`` the stack starts on a socket in its home.
The pools, queues, priorities and deployments are the process lane's; what changes is where a
run executes. This module holds what the worker and the stack need to agree on, with no
Prefect or Docker import: where the image keeps the code, what a run's container is given, and
how the podman service is started and checked.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskserver.errors import TaskserverError
from taskserver.platform.client_env import CLIENT_ENV, prefect_results_env
from taskserver.settings import env_name

IMAGE_CODE_DIR = "/opt/taskserver"
"""Where the images keep the repository (images/Dockerfile.cpu's WORKDIR): the container pools'
deployments change into it before they load their flow (the host's checkout is not mounted)."""
IMAGE_HOME = "/tmp/taskserver"
"""TASKSERVER_HOME inside a run's container: writable whatever the user (the embedding cache)."""
IMAGE_PREFECT_HOME = "/tmp/prefect"
"""PREFECT_HOME inside a run's container (the image's own default): the worker's is a host path."""
PULL_POLICY = "Never"
"""The container pools never pull: the image is built locally (registries may be unreachable)."""
HOME_LABEL = "io.taskserver.home"
"""The label that names the stack home a run's container belongs to (``taskserver down`` stops them)."""
FLOW_RUN_LABEL = "io.prefect.flow-run-id"
"""prefect-docker's label of a container's flow run."""
EXTRA_HINT = "pip install 'taskserver[containers]'"
"""What to do when prefect-docker is missing (the bootstrap and ``up --containers`` both say it)."""
SOCKET_NAME = "podman.sock"
"""The podman API socket's file name in the stack's run directory."""


class ContainerLaneError(TaskserverError):
    """The container lane cannot start: no container engine, no image."""


@dataclass(frozen=True)
class RunContainer:
    """What every run's container gets besides its image and command."""

    env: dict[str, str]
    volumes: list[str]
    user: str
    labels: dict[str, str]


def run_container(data_location: str, uid: int, gid: int, home: str = "") -> RunContainer:
    """The data location mounted at the same path (so paths in parameters and results mean the same
    thing inside and out), Prefect's results in it, the host user's ids, so the files a run
    writes there belong to whoever started the stack, and a label naming the stack's ``home``."""
    env = {
        **CLIENT_ENV,
        **prefect_results_env(data_location),
        env_name("data_dir"): data_location,
        env_name("home"): IMAGE_HOME,
        "PREFECT_HOME": IMAGE_PREFECT_HOME,
    }
    volumes = [] if "://" in data_location else [f"{data_location}:{data_location}"]
    return RunContainer(env=env, volumes=volumes, user=f"{uid}:{gid}", labels={HOME_LABEL: home} if home else {})


def apply_run_container(job: Any, run: RunContainer) -> None:
    """Fill a Docker job configuration's env, volumes, labels and user; what the deployment or pool
    set wins."""
    job.env = {**run.env, **{k: v for k, v in (job.env or {}).items() if v is not None}}
    targets = {volume.split(":")[1] for volume in job.volumes if ":" in volume}
    job.volumes = [*job.volumes, *(v for v in run.volumes if v.split(":")[1] not in targets)]
    job.labels = {**run.labels, **(job.labels or {})}
    kwargs = dict(job.container_create_kwargs or {})
    kwargs.setdefault("user", run.user)
    job.container_create_kwargs = kwargs


def with_image_defaults(template: dict[str, Any], image: str) -> dict[str, Any]:
    """The Docker worker's base job template with the container lane's defaults: the local CPU
    image, never pulled, on the host's network (the API listens on 127.0.0.1), removed when done."""
    properties = template["variables"]["properties"]
    defaults = {"image": image, "image_pull_policy": PULL_POLICY, "network_mode": "host", "auto_remove": True}
    for name, value in defaults.items():
        properties[name]["default"] = value
    return template


def podman_service_argv(socket_path: Path) -> list[str]:
    """``podman system service`` on ``socket_path``, never timing out while the stack runs."""
    podman = shutil.which("podman")
    if podman is None:
        raise ContainerLaneError(
            "--containers", "found no container engine: DOCKER_HOST is not set and podman is not installed",
            "set DOCKER_HOST to a Docker API socket, or install podman",
        )
    return [podman, "system", "service", "--time=0", f"unix://{socket_path}"]


def engine_answers(docker_host: str, timeout: float = 2.0) -> bool:
    """Whether the Docker API at ``docker_host`` (``unix://PATH``) answers ``GET /_ping``."""
    if not docker_host.startswith("unix://"):
        return True  # tcp:// and ssh:// engines are the user's to run; the worker reports errors
    path = docker_host.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
            status_line = conn.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and status_line.split()[1:2] == [b"200"]
