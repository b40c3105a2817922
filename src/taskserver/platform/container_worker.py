"""The ``taskserver-container`` worker: Prefect's Docker worker (``prefect-docker``) for the local
stack's job-lane pools under ``taskserver up --containers``.

What it adds to ``DockerWorker``: it polls when a run of its pool changes state (``WakeOnRunEvents``,
like the process and warm workers), and it gives each run's container the stack's data location
(mounted at the same path), Prefect's results in it and the host user's ids
(``taskserver.platform.containers``). Needs the ``containers`` extra.
"""

from __future__ import annotations

import os
from typing import Any

import anyio.abc
from prefect.client.schemas.objects import FlowRun
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult

from taskserver.platform.containers import ContainerLaneError, apply_run_container, run_container, with_image_defaults
from taskserver.platform.tasks import CONTAINER_WORKER_TYPE
from taskserver.platform.wakeup import WakeOnRunEvents
from taskserver.settings import env_name, get_settings


class ContainerWorker(WakeOnRunEvents, DockerWorker):
    """Runs each flow run in a container of the CPU image."""

    type = CONTAINER_WORKER_TYPE
    _display_name = "Taskserver container"
    _description = (
        "Runs flow runs in containers of the taskserver CPU image through a Docker-compatible API"
        " (Docker, or podman's `podman system service`), with the stack's data location mounted."
    )

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return with_image_defaults(DockerWorker.get_default_base_job_template(), get_settings().container_image)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DockerWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        try:
            settings = get_settings()
            data_location = settings.data_location
            if "://" not in data_location:
                os.makedirs(data_location, exist_ok=True)  # else the engine creates it, owned by root
            apply_run_container(configuration, run_container(data_location, os.getuid(), os.getgid(),
                                                             home=str(settings.home.expanduser().resolve())))
            return await super().run(flow_run, configuration, task_status)
        finally:
            self.wake()  # this slot frees as run() returns: look for the next run at once


def require_image(docker_host: str, image: str) -> None:
    """Raise ``ContainerLaneError`` unless the engine at ``docker_host`` has ``image`` (never pulled)."""
    import docker
    from docker.errors import DockerException, ImageNotFound

    engine = f"the container engine at {docker_host}"
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=30)
    except DockerException as exc:
        raise ContainerLaneError(engine, f"does not answer: {exc}") from exc
    try:
        client.images.get(image)
    except ImageNotFound:
        raise ContainerLaneError(
            f"image {image!r}", f"is not in {engine} (the container lane never pulls)",
            f"build it: podman build -t {image} -f images/Dockerfile.cpu . ; or set"
            f" {env_name('container_image')} to an image that is there",
        ) from None
    except DockerException as exc:
        raise ContainerLaneError(engine, f"does not answer: {exc}") from exc
    finally:
        client.close()
