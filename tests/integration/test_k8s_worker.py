"""The Jobs that Prefect's real Kubernetes worker code builds from taskserver's templates.

A real Prefect server holds ``kubernetes`` pools with the generated base job templates and one
deployment per task × priority. prefect-kubernetes renders each deployment's Job, which must
be valid for Kubernetes (strict schema) and carry its priority class, resources and placement.
Last, the real KubernetesWorker submits a flow run to an in-memory Kubernetes API (kmock).
"""

from __future__ import annotations

import asyncio
import copy
import os
from typing import Any

import kubernetes_validate
import pytest

os.environ.setdefault("DO_NOT_TRACK", "true")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration  # noqa: E402

from taskserver.platform.gpus import GPU_RESOURCE, GPU_TYPE_LABEL, all_gpu_tolerations  # noqa: E402
from taskserver.platform.kubernetes import (  # noqa: E402
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    KueueOptions,
    PoolJobOptions,
    SharedData,
    base_job_template,
    default_options,
    job_variables,
)
from taskserver.platform.priorities import PRIORITIES  # noqa: E402
from taskserver.platform.tasks import POOLS, TASKS, get_task  # noqa: E402

pytestmark = pytest.mark.timeout(600)

KUBERNETES_VERSION = "1.33.0"
UPSTREAM_POD_SPEC_EXTRAS = ("completions", "parallelism")
"""prefect-kubernetes 0.8.0 insists on these two Job fields inside the *pod* spec (its
manifest validator fails without them). They are not PodSpec fields: the API server drops
them with a warning. The strict check removes exactly these, and
``test_upstream_quirk_is_still_the_only_schema_violation`` notices when upstream fixes it."""


def options_for(pool_name: str) -> PoolJobOptions:
    """Options like the chart's: a shared volume, Kueue, a jobs namespace and service account."""
    pool = next(p for p in POOLS if p.name == pool_name)
    return default_options(pool).model_copy(
        update={
            "namespace": "taskserver-jobs",
            "service_account_name": f"taskserver-{pool.name}-job",
            "data": SharedData(kind="volume", claim_name="taskserver-data"),
            "kueue": KueueOptions(enabled=True, queue_name="taskserver"),
        }
    )


def strict_validate(manifest: dict[str, Any]) -> None:
    cleaned = copy.deepcopy(manifest)
    for field in UPSTREAM_POD_SPEC_EXTRAS:
        cleaned["spec"]["template"]["spec"].pop(field, None)
    kubernetes_validate.validate(cleaned, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def render_server():
    """A server of its own: its pools are Kubernetes pools, unlike the platform server's."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _create_pools_and_deployments() -> dict[str, Any]:
    """Pools with the generated templates; one deployment per task × priority, one run each."""
    rendered: dict[str, Any] = {}
    async with get_client() as client:
        pools = {}
        for pool in POOLS:
            pools[pool.name] = await client.create_work_pool(
                WorkPoolCreate(name=pool.name, type="kubernetes", base_job_template=base_job_template(pool, options_for(pool.name))),
                overwrite=True,
            )
        for task in TASKS:
            flow_id = await client.create_flow_from_name(task.name)
            for level in PRIORITIES:
                deployment_id = await client.create_deployment(
                    flow_id=flow_id,
                    name=level.name,
                    work_pool_name=task.pool.name,
                    work_queue_name=level.work_queue,
                    entrypoint=task.entrypoint,
                    job_variables=job_variables(task, level),
                )
                deployment = await client.read_deployment(deployment_id)
                flow_run = await client.create_flow_run_from_deployment(deployment_id)
                flow = await client.read_flow(flow_id)
                work_pool = pools[task.pool.name]
                configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
                    work_pool.base_job_template, deployment.job_variables, client=client
                )
                configuration.prepare_for_flow_run(
                    flow_run, deployment=deployment, flow=flow, work_pool=work_pool, worker_name="render-test"
                )
                rendered[f"{task.name}/{level.name}"] = configuration.job_manifest
    return rendered


@pytest.fixture(scope="module")
def rendered_jobs(render_server) -> dict[str, Any]:
    return asyncio.run(_create_pools_and_deployments())


def test_every_deployment_and_priority_renders_a_job(rendered_jobs) -> None:
    assert sorted(rendered_jobs) == sorted(f"{t.name}/{p.name}" for t in TASKS for p in PRIORITIES)


def test_every_rendered_job_is_strictly_valid_kubernetes(rendered_jobs) -> None:
    for name, manifest in rendered_jobs.items():
        try:
            strict_validate(manifest)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def test_upstream_quirk_is_still_the_only_schema_violation(rendered_jobs) -> None:
    manifest = rendered_jobs["encode/high"]
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    assert all(field in caught.value.message for field in UPSTREAM_POD_SPEC_EXTRAS)


def test_each_job_carries_its_priority_class(rendered_jobs) -> None:
    for task in TASKS:
        for level in PRIORITIES:
            manifest = rendered_jobs[f"{task.name}/{level.name}"]
            assert manifest["spec"]["template"]["spec"]["priorityClassName"] == level.priority_class_name
            assert manifest["metadata"]["labels"][KUEUE_PRIORITY_LABEL] == level.priority_class_name
            assert manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "taskserver"


def test_gpu_jobs_request_gpus_and_land_on_gpu_nodes(rendered_jobs) -> None:
    for task in TASKS:
        manifest = rendered_jobs[f"{task.name}/normal"]
        spec = manifest["spec"]["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        if task.pool.gpu:
            assert limits[GPU_RESOURCE] == 1
            assert spec["tolerations"] == all_gpu_tolerations()
            expression = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ][0]["matchExpressions"][0]
            assert expression == {"key": GPU_TYPE_LABEL, "operator": "In", "values": ["l4"]}
        else:
            assert GPU_RESOURCE not in limits
            assert spec["tolerations"] == [] and "affinity" not in spec


def test_jobs_are_evictable_non_root_and_mount_the_shared_data(rendered_jobs) -> None:
    for name, manifest in rendered_jobs.items():
        spec = manifest["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert manifest["spec"]["backoffLimit"] == 0, name
        assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule", name
        assert env["TASKSERVER_DATA_DIR"] == "/data", name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"], name
        assert spec["serviceAccountName"].startswith("taskserver-"), name
        assert manifest["metadata"]["namespace"] == "taskserver-jobs", name


def test_gpu_type_chosen_at_submission_moves_the_job(render_server) -> None:
    async def render() -> dict[str, Any]:
        task = get_task("train")
        values = job_variables(task, "critical", gpu_type="h100", gpu_count=4)
        async with get_client() as client:
            configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
                base_job_template(task.pool, options_for("gpu")), values, client=client
            )
        from prefect.client.schemas.objects import FlowRun

        configuration.prepare_for_flow_run(FlowRun(flow_id=__import__("uuid").uuid4(), name="gpu-move"))
        return configuration.job_manifest

    manifest = asyncio.run(render())
    spec = manifest["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 4
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["h100"]
    assert spec["priorityClassName"] == "taskserver-critical"
    strict_validate(manifest)


# --- The real worker against an in-memory Kubernetes API ------------------------------------------


def _kubeconfig(server_url: str) -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: kmock
  cluster: {{server: "{server_url}"}}
users:
- name: kmock
  user: {{token: not-a-real-token}}
contexts:
- name: kmock
  context: {{cluster: kmock, user: kmock, namespace: taskserver-jobs}}
current-context: kmock
"""


def test_real_worker_submits_the_deployments_job_to_kubernetes(render_server, tmp_path, monkeypatch) -> None:
    kmock = pytest.importorskip("kmock")
    from kubernetes_asyncio.config import kube_config

    # What the chart sets on the worker: the job pods read the auth string from the Secret.
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED", "false")
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME", "taskserver-api-auth")
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY", "auth-string")

    async def submit() -> tuple[list[dict[str, Any]], str]:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            config_path = tmp_path / "kubeconfig"
            config_path.write_text(_kubeconfig(str(server.url).rstrip("/")))
            monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config_path))
            task, level = get_task("train"), PRIORITIES[0]
            async with get_client() as client:
                await client.create_work_pool(
                    WorkPoolCreate(name="gpu-kmock", type="kubernetes", base_job_template=base_job_template(task.pool, options_for("gpu"))),
                    overwrite=True,
                )
                flow_id = await client.create_flow_from_name(task.name)
                deployment_id = await client.create_deployment(
                    flow_id=flow_id,
                    name=f"{level.name}-kmock",
                    work_pool_name="gpu-kmock",
                    work_queue_name=level.work_queue,
                    entrypoint=task.entrypoint,
                    job_variables=job_variables(task, level, gpu_type="a100"),
                )
                flow_run = await client.create_flow_run_from_deployment(deployment_id)
            with temporary_settings({PREFECT_API_AUTH_STRING: "admin:do-not-leak"}):
                async with KubernetesWorker(work_pool_name="gpu-kmock", name="kmock-worker") as worker:
                    await worker.get_and_submit_flow_runs()
                    for _ in range(100):  # submission runs in the worker's task group
                        if any(key[0].plural == "jobs" for key in emulator.objects.keys()):
                            break
                        await asyncio.sleep(0.1)
            jobs = [obj.last.raw for key, obj in emulator.objects.items() if key[0].plural == "jobs"]
            return jobs, str(flow_run.id)

    jobs, flow_run_id = asyncio.run(submit())
    assert len(jobs) == 1
    (job,) = jobs
    assert job["metadata"]["namespace"] == "taskserver-jobs"
    assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == flow_run_id
    spec = job["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == PRIORITIES[0].priority_class_name
    assert spec["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 1
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["a100"]
    env = {item["name"]: item for item in spec["containers"][0]["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == flow_run_id
    assert env["PREFECT_API_AUTH_STRING"] == {
        "name": "PREFECT_API_AUTH_STRING",
        "valueFrom": {"secretKeyRef": {"name": "taskserver-api-auth", "key": "auth-string"}},
    }
    assert "do-not-leak" not in str(job)
    strict_validate(job)
