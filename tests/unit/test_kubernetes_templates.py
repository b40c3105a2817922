"""Base job templates and the GPU catalogue, checked without a server or a cluster."""

from __future__ import annotations

import json

import pytest

from taskserver.errors import ParameterError
from taskserver.platform import gpus
from taskserver.platform.gpus import GPU_RESOURCE, GPU_TYPE_LABEL, GPUS, all_gpu_tolerations, get_gpu
from taskserver.platform.kubernetes import (
    JOB_OPTIONS_ENV,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    RUN_AS_USER,
    KueueOptions,
    PoolJobOptions,
    SharedData,
    base_job_template,
    default_options,
    job_variables,
    options_from_environment,
    platform_document,
    write_job_templates,
)
from taskserver.platform.priorities import PRIORITIES, get_priority
from taskserver.platform.tasks import CPU_POOL, GPU_POOL, POOLS, get_task

UPSTREAM_VARIABLES = {
    "name", "env", "labels", "command", "annotations", "namespace", "image", "service_account_name",
    "image_pull_policy", "backoff_limit", "finished_job_ttl", "job_watch_timeout_seconds",
    "pod_watch_timeout_seconds", "stream_output", "cluster_config", "cpu_request", "cpu_limit",
    "memory_request", "memory_limit",
}


def pod_spec(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def test_templates_keep_every_prefect_kubernetes_variable() -> None:
    for pool in POOLS:
        properties = base_job_template(pool, default_options(pool))["variables"]["properties"]
        assert UPSTREAM_VARIABLES <= set(properties), pool.name


def test_priority_class_variable_lists_exactly_the_priority_model() -> None:
    schema = base_job_template(CPU_POOL, default_options(CPU_POOL))["variables"]["properties"]
    assert schema["priority_class_name"]["enum"] == [level.priority_class_name for level in PRIORITIES]
    assert schema["priority_class_name"]["default"] == "taskserver-normal"
    assert pod_spec(base_job_template(CPU_POOL, default_options(CPU_POOL)))["priorityClassName"] == (
        "{{ priority_class_name }}"
    )


def test_eviction_and_slow_gpu_scale_up_defaults() -> None:
    for pool in POOLS:
        properties = base_job_template(pool, default_options(pool))["variables"]["properties"]
        assert properties["backoff_limit"]["default"] == 0  # evicted run is rescheduled by Prefect
        assert properties["pod_watch_timeout_seconds"]["default"] >= 900
        assert properties["finished_job_ttl"]["default"] == 3600


def test_gpu_pool_requests_gpus_and_picks_nodes_by_catalogue_label() -> None:
    template = base_job_template(GPU_POOL, default_options(GPU_POOL))
    spec = pod_spec(template)
    (container,) = spec["containers"]
    assert container["resources"]["limits"][GPU_RESOURCE] == "{{ gpu_count }}"
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": GPU_TYPE_LABEL, "operator": "In", "values": ["{{ gpu_type }}"]}]
    properties = template["variables"]["properties"]
    assert properties["gpu_type"]["enum"] == [gpu.name for gpu in GPUS]
    assert properties["tolerations"]["default"] == all_gpu_tolerations()


def test_cpu_pool_has_no_gpu_variables_or_gpu_limits() -> None:
    template = base_job_template(CPU_POOL, default_options(CPU_POOL))
    assert "gpu_type" not in template["variables"]["properties"]
    assert GPU_RESOURCE not in json.dumps(template["job_configuration"])
    assert "affinity" not in pod_spec(template)


def test_every_job_runs_as_the_images_non_root_user() -> None:
    for pool in POOLS:
        spec = pod_spec(base_job_template(pool, default_options(pool)))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == RUN_AS_USER
        assert spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_tolerations_schema_is_inlined_and_typed() -> None:
    schema = base_job_template(GPU_POOL, default_options(GPU_POOL))["variables"]
    assert "$defs" not in json.dumps(schema) and "#/$defs" not in json.dumps(schema)
    item = schema["properties"]["tolerations"]["items"]
    assert item["properties"]["effect"]["anyOf"][0]["enum"] == ["NoSchedule", "PreferNoSchedule", "NoExecute"]


def test_kueue_labels_only_when_enabled() -> None:
    plain = base_job_template(CPU_POOL, default_options(CPU_POOL))
    assert "kueue" not in json.dumps(plain)
    options = default_options(CPU_POOL).model_copy(update={"kueue": KueueOptions(enabled=True, queue_name="team-a")})
    template = base_job_template(CPU_POOL, options)
    labels = template["job_configuration"]["job_manifest"]["metadata"]["labels"]
    assert labels == {KUEUE_QUEUE_LABEL: "{{ kueue_queue_name }}", KUEUE_PRIORITY_LABEL: "{{ priority_class_name }}"}
    assert template["variables"]["properties"]["kueue_queue_name"]["default"] == "team-a"


def test_shared_volume_is_mounted_and_announced_to_flows() -> None:
    options = default_options(CPU_POOL).model_copy(
        update={"data": SharedData(kind="volume", claim_name="taskserver-data", mount_path="/shared")}
    )
    spec = pod_spec(base_job_template(CPU_POOL, options))
    assert spec["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "taskserver-data"}}]
    container = spec["containers"][0]
    assert {"name": "data", "mountPath": "/shared"} in container["volumeMounts"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TASKSERVER_DATA_DIR"] == "/shared"
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == "/shared/prefect-results"


def test_object_store_credentials_come_from_a_secret_not_a_literal() -> None:
    data = SharedData(kind="object_store", url="s3://bucket/runs", credentials_secret="s3-creds")
    env = {item["name"]: item for item in data.env()}
    assert env["TASKSERVER_DATA_DIR"]["value"] == "s3://bucket/runs"
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}},
    }


def test_incomplete_shared_data_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="claim_name"):
        SharedData(kind="volume")
    with pytest.raises(ValueError, match="s3://"):
        SharedData(kind="object_store")


def test_job_variables_carry_the_priority_class_of_the_deployment() -> None:
    for level in PRIORITIES:
        assert job_variables(get_task("encode"), level) == {"priority_class_name": level.priority_class_name}
    assert job_variables(get_task("train"), "high", gpu_type="h100", gpu_count=2)["gpu_type"] == "h100"


def test_job_variables_reject_unknown_gpu_and_unknown_variable() -> None:
    with pytest.raises(ParameterError, match="gpu_type"):
        job_variables(get_task("train"), "high", gpu_type="tpu-v5")
    with pytest.raises(ParameterError, match="unknown variables"):
        job_variables(get_task("encode"), "high", gpu_count=1)
    with pytest.raises(ParameterError, match="unknown priority"):
        job_variables(get_task("encode"), "urgent")


def test_unknown_gpu_type_names_the_catalogue() -> None:
    with pytest.raises(ParameterError, match="choose one of: l4, a10g, a100, h100"):
        get_gpu("v100")
    with pytest.raises(ValueError, match="gpu_type"):
        PoolJobOptions(image="x", gpu_type="v100")


def test_gpu_catalogue_derives_placement_in_one_place() -> None:
    a100 = get_gpu("a100")
    assert a100.node_selector() == {GPU_TYPE_LABEL: "a100"}
    assert a100.tolerations() == [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    assert gpus.DEFAULT_GPU in gpus.gpu_names()


def test_options_from_environment_reads_the_charts_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "job-options.json"
    path.write_text(json.dumps({"gpu": {"image": "registry.local/gpu:1", "gpu_type": "a100", "namespace": "jobs"}}))
    monkeypatch.setenv(JOB_OPTIONS_ENV, str(path))
    options = options_from_environment(GPU_POOL)
    assert (options.image, options.gpu_type, options.namespace) == ("registry.local/gpu:1", "a100", "jobs")
    assert options_from_environment(CPU_POOL) == default_options(CPU_POOL)
    template = base_job_template(GPU_POOL)
    assert template["variables"]["properties"]["gpu_type"]["default"] == "a100"


def test_bad_options_file_names_the_file_and_pool(tmp_path, monkeypatch) -> None:
    path = tmp_path / "job-options.json"
    path.write_text(json.dumps({"gpu": {"image": "x", "gpu_type": "tpu"}}))
    monkeypatch.setenv(JOB_OPTIONS_ENV, str(path))
    with pytest.raises(ParameterError, match="pool 'gpu'"):
        options_from_environment(GPU_POOL)


def test_write_job_templates_writes_one_json_per_pool(tmp_path) -> None:
    written = write_job_templates(tmp_path)
    assert sorted(written) == sorted(pool.name for pool in POOLS)
    assert json.loads(written["gpu"].read_text()) == base_job_template(GPU_POOL, default_options(GPU_POOL))


def test_platform_document_mirrors_the_priority_model() -> None:
    document = platform_document()
    for entry in document["priorities"]:
        level = get_priority(entry["name"])
        assert (entry["className"], entry["value"], entry["preemptionPolicy"]) == (
            level.priority_class_name, level.class_value, level.preemption_policy.value,
        )
    assert [gpu["name"] for gpu in document["gpus"]] == gpus.gpu_names()
