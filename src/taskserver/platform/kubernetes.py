"""Work-pool base job templates for Prefect's Kubernetes worker, generated from typed models.

prefect-kubernetes' own default template is the starting point. taskserver adds priority
classes, placement (node selector, tolerations, GPU type and count from the GPU catalogue),
the shared data location, non-root security contexts and optional Kueue labels. The
template's ``variables`` section is the JSON schema of the models below, so the Prefect UI,
the bootstrap and the Helm chart all read one definition.
"""

from __future__ import annotations

import copy
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskserver import __version__
from taskserver.errors import ParameterError
from taskserver.platform.gpus import (
    DEFAULT_GPU,
    GPU_RESOURCE,
    GPU_TYPE_LABEL,
    all_gpu_tolerations,
    get_gpu,
    gpu_names,
)
from taskserver.platform.priorities import (
    DEFAULT_PRIORITY,
    PRIORITIES,
    PriorityLevel,
    get_priority,
)
from taskserver.platform.client_env import CLIENT_ENV, RESULTS_DIRNAME, prefect_results_env
from taskserver.platform.tasks import POOLS, Pool, TaskType
from taskserver.settings import Settings, env_name, get_settings

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
POOL_LABEL = "taskserver.io/pool"
JOB_CONTAINER = "prefect-job"
"""prefect-kubernetes requires the first container to carry this name."""
DATA_VOLUME = "data"
RUN_AS_USER = 10001
"""The non-root user of both images (images/Dockerfile.*); the chart uses the same id."""
POD_WATCH_TIMEOUT_SECONDS = 900
"""Long enough for a GPU node to scale up from zero before the worker gives up on the pod."""
DEFAULT_KUEUE_QUEUE = "taskserver"
"""The Kueue LocalQueue a job is labelled for unless its pool's options (the chart's kueue.localQueue) say otherwise."""
MAX_GPUS_PER_JOB = 8
"""One node's GPUs at most: a job's pod cannot span nodes."""
JOB_OPTIONS_ENV = env_name("k8s_job_options")
"""Path of a JSON file ``{pool name: PoolJobOptions}``; the chart's bootstrap hook sets it."""
OBJECT_STORE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

PriorityClassName = Literal[tuple(level.priority_class_name for level in PRIORITIES)]  # type: ignore[valid-type]
GpuName = Literal[tuple(gpu_names())]  # type: ignore[valid-type]


class Toleration(BaseModel):
    """A Kubernetes toleration, with the field names Kubernetes uses."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None  # noqa: N815 (the Kubernetes field name)

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


# --- The job variables: each field becomes a variable of the base job template. ---------------


class JobVariables(BaseModel):
    """Variables taskserver adds to prefect-kubernetes' own, for every pool."""

    priority_class_name: PriorityClassName = Field(  # type: ignore[valid-type]
        default=get_priority(DEFAULT_PRIORITY).priority_class_name,
        title="Priority Class",
        description=(
            "Kubernetes PriorityClass of the job's pod; deployments named <flow>/<priority> set"
            " the class of their priority. A higher class is scheduled first and may preempt."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        title="Node Selector",
        description="Node labels the job's pod must run on, in addition to any GPU type.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        title="Tolerations",
        description="Taints the job's pod tolerates (GPU pools tolerate the GPU taints already).",
    )


class GpuJobVariables(JobVariables):
    """Variables of a GPU pool: which GPU from the catalogue, and how many."""

    gpu_type: GpuName = Field(  # type: ignore[valid-type]
        default=DEFAULT_GPU,
        title="GPU Type",
        description="A GPU from taskserver's catalogue; the pod runs on nodes labelled with it.",
    )
    gpu_count: int = Field(
        default=1, ge=1, le=MAX_GPUS_PER_JOB, title="GPU Count", description=f"How many {GPU_RESOURCE} the pod requests."
    )


class KueueJobVariables(BaseModel):
    kueue_queue_name: str = Field(
        default=DEFAULT_KUEUE_QUEUE,
        title="Kueue LocalQueue",
        description="The Kueue LocalQueue that admits the job (label kueue.x-k8s.io/queue-name).",
    )


# --- Options: what a platform team sets per pool (the chart's values, or code). ---------------


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


class SharedData(BaseModel):
    """The one shared data location every job reaches at the same address."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "volume", "object_store"] = "none"
    claim_name: str | None = None
    """A ReadWriteMany PersistentVolumeClaim, for ``kind="volume"``."""
    mount_path: str = "/data"
    url: str | None = None
    """An fsspec URL such as ``s3://bucket/prefix``, for ``kind="object_store"``."""
    credentials_secret: str | None = None
    """A Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, for ``object_store``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph); empty for AWS S3."""
    result_storage_block: str | None = None
    """A Prefect storage block (``s3-bucket/results``) for results when the data is in a bucket."""

    @model_validator(mode="after")
    def _complete(self) -> SharedData:
        if self.kind == "volume" and not self.claim_name:
            raise ValueError("a shared data volume needs claim_name (a ReadWriteMany claim)")
        if self.kind == "object_store" and not self.url:
            raise ValueError("shared data in an object store needs url, e.g. s3://bucket/prefix")
        return self

    def env(self) -> list[dict[str, Any]]:
        """Environment that tells flows (TASKSERVER_DATA_DIR) and Prefect where data lives."""
        if self.kind == "volume":
            return [{"name": "TASKSERVER_DATA_DIR", "value": self.mount_path}] + [
                {"name": name, "value": value}
                for name, value in prefect_results_env(self.mount_path).items()
            ]
        if self.kind == "object_store":
            env: list[dict[str, Any]] = [{"name": "TASKSERVER_DATA_DIR", "value": self.url}]
            if self.endpoint_url:
                env.append({"name": "AWS_ENDPOINT_URL", "value": self.endpoint_url})
            if self.credentials_secret:
                env += [
                    {
                        "name": key,
                        "valueFrom": {"secretKeyRef": {"name": self.credentials_secret, "key": key}},
                    }
                    for key in OBJECT_STORE_SECRET_KEYS
                ]
            if self.result_storage_block:
                env += [
                    {"name": "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", "value": self.result_storage_block},
                    {"name": "PREFECT_RESULTS_PERSIST_BY_DEFAULT", "value": "true"},
                ]
            return env
        return []


class KueueOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    queue_name: str = DEFAULT_KUEUE_QUEUE


class PoolJobOptions(BaseModel):
    """Per-pool defaults baked into a base job template; deployments may override variables."""

    model_config = ConfigDict(extra="forbid")

    image: str
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    namespace: str = "default"
    service_account_name: str | None = None
    resources: Resources = Field(default_factory=Resources)
    priority: str = DEFAULT_PRIORITY
    priority_class_prefix: str = ""
    """Put before the model's PriorityClass names in the pod (the chart's
    ``priorityClasses.namePrefix``); job variables keep the model's names."""
    gpu_type: str = DEFAULT_GPU
    gpu_count: int = Field(default=1, ge=1, le=MAX_GPUS_PER_JOB)
    finished_job_ttl: int | None = Field(default=3600, ge=0)
    pod_watch_timeout_seconds: int = Field(default=POD_WATCH_TIMEOUT_SECONDS, ge=1)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    data: SharedData = Field(default_factory=SharedData)
    kueue: KueueOptions = Field(default_factory=KueueOptions)

    @field_validator("priority")
    @classmethod
    def _known_priority(cls, value: str) -> str:
        try:
            get_priority(value)
        except ParameterError as exc:  # a ValueError lets pydantic name the field
            raise ValueError(str(exc)) from None
        return value

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        try:
            get_gpu(value)
        except ParameterError as exc:
            raise ValueError(str(exc)) from None
        return value


def default_options(pool: Pool) -> PoolJobOptions:
    """Sensible defaults for a pool: the project's image and modest resources."""
    if pool.gpu:
        return PoolJobOptions(
            image=f"taskserver-gpu:{__version__}",
            resources=Resources(cpu_request="4", cpu_limit="8", memory_request="16Gi", memory_limit="32Gi"),
        )
    return PoolJobOptions(
        image=f"taskserver-cpu:{__version__}",
        resources=Resources(cpu_request="500m", cpu_limit="2", memory_request="2Gi", memory_limit="4Gi"),
    )


def options_from_environment(pool: Pool) -> PoolJobOptions:
    """The pool's options from the file named by TASKSERVER_K8S_JOB_OPTIONS, else the defaults."""
    path = get_settings().k8s_job_options
    if not path:
        return default_options(pool)
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ParameterError(f"{JOB_OPTIONS_ENV}={path}", f"cannot read job options: {exc}") from exc
    if pool.name not in document:
        return default_options(pool)
    try:
        return PoolJobOptions.model_validate(document[pool.name])
    except ValidationError as exc:
        raise ParameterError(
            f"{path}: pool {pool.name!r}", f"invalid job options: {exc}", "check the chart's workers values"
        ) from exc


# --- Template generation ------------------------------------------------------------------------


def variables_model(pool: Pool, kueue: bool = False) -> type[BaseModel]:
    """The typed model whose JSON schema is the pool's taskserver variables."""
    base: type[BaseModel] = GpuJobVariables if pool.gpu else JobVariables
    if not kueue:
        return base
    return type(f"{base.__name__}WithKueue", (base, KueueJobVariables), {"__doc__": base.__doc__})


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace pydantic's ``$defs`` references with their definitions (one flat schema)."""
    definitions = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(copy.deepcopy(definitions[ref.removeprefix("#/$defs/")]))
            return {key: walk(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(schema)


def _upstream_template() -> dict[str, Any]:
    from prefect_kubernetes.worker import KubernetesWorker  # heavy import, only when generating

    return copy.deepcopy(KubernetesWorker.get_default_base_job_template())


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def _variables(pool: Pool, options: PoolJobOptions, upstream: dict[str, Any]) -> dict[str, Any]:
    model = variables_model(pool, kueue=options.kueue.enabled)
    ours = _inline_refs(model.model_json_schema())
    variables = copy.deepcopy(upstream)
    variables["description"] = (
        f"Job variables of taskserver's {pool.name!r} pool: prefect-kubernetes' own, plus"
        f" {', '.join(ours['properties'])}."
    )
    variables["properties"].update(ours["properties"])
    defaults: dict[str, Any] = {
        "image": options.image,
        "image_pull_policy": options.image_pull_policy,
        "namespace": options.namespace,
        "service_account_name": options.service_account_name,
        "backoff_limit": 0,
        "finished_job_ttl": options.finished_job_ttl,
        "pod_watch_timeout_seconds": options.pod_watch_timeout_seconds,
        "env": {**CLIENT_ENV, **options.env},
        "priority_class_name": get_priority(options.priority).priority_class_name,
        "node_selector": dict(options.node_selector),
        "tolerations": [t.manifest() for t in options.tolerations],
        **options.resources.model_dump(),
    }
    if pool.gpu:
        defaults["gpu_type"] = options.gpu_type
        defaults["gpu_count"] = options.gpu_count
        defaults["tolerations"] = all_gpu_tolerations() + defaults["tolerations"]
    if options.kueue.enabled:
        defaults["kueue_queue_name"] = options.kueue.queue_name
    for name, value in defaults.items():
        variables["properties"][name]["default"] = value
    return variables


def base_job_template(pool: Pool, options: PoolJobOptions | None = None) -> dict[str, Any]:
    """The base job template of a ``kubernetes`` work pool for ``pool``.

    Without ``options`` they come from :func:`options_from_environment`, which is how the
    chart's bootstrap hook passes its values.
    """
    options = options or options_from_environment(pool)
    template = _upstream_template()
    job_configuration = template["job_configuration"]
    manifest = job_configuration["job_manifest"]
    pod_template = manifest["spec"]["template"]
    pod_spec = pod_template["spec"]
    (container,) = pod_spec["containers"]
    assert container["name"] == JOB_CONTAINER, "prefect-kubernetes' template changed shape"

    pod_template["metadata"] = {"labels": {POOL_LABEL: pool.name}}
    priority_class = options.priority_class_prefix + "{{ priority_class_name }}"
    pod_spec["priorityClassName"] = priority_class
    pod_spec["nodeSelector"] = "{{ node_selector }}"
    pod_spec["tolerations"] = "{{ tolerations }}"
    pod_spec["securityContext"] = pod_security_context()
    container["securityContext"] = container_security_context()

    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if options.data.kind == "volume":
        volumes.append({"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": options.data.claim_name}})
        mounts.append({"name": DATA_VOLUME, "mountPath": options.data.mount_path})
    if pool.gpu:
        container["resources"]["limits"][GPU_RESOURCE] = "{{ gpu_count }}"
        pod_template["metadata"]["labels"][GPU_TYPE_LABEL] = "{{ gpu_type }}"
        # The GPU is chosen by node label, so changing gpu_type alone moves the job.
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": GPU_TYPE_LABEL, "operator": "In", "values": ["{{ gpu_type }}"]}]}
                    ]
                }
            }
        }
        # PyTorch data loaders share tensors through /dev/shm, which is 64 MiB by default.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if volumes:
        pod_spec["volumes"] = volumes
        container["volumeMounts"] = mounts
    data_env = options.data.env()
    if data_env:
        # A literal list here is kept by the worker; Prefect's own env is prepended to it.
        container["env"] = data_env
    if options.kueue.enabled:
        manifest["metadata"]["labels"] = {
            KUEUE_QUEUE_LABEL: "{{ kueue_queue_name }}",
            KUEUE_PRIORITY_LABEL: priority_class,
        }

    template["variables"] = _variables(pool, options, template["variables"])
    return template


def job_variables(task: TaskType, priority: PriorityLevel | str, **overrides: Any) -> dict[str, Any]:
    """The job variables of the deployment ``<task>/<priority>``.

    ``overrides`` are validated against the pool's variables model (a GPU type must be in the
    catalogue, a priority class must exist) so a typo fails here, not in the cluster.
    """
    level = get_priority(priority) if isinstance(priority, str) else priority
    values = {"priority_class_name": level.priority_class_name, **overrides}
    model = variables_model(task.pool, kueue="kueue_queue_name" in overrides)
    upstream = _upstream_variables()
    unknown = set(values) - set(model.model_fields) - upstream
    if unknown:
        raise ParameterError(
            f"job variables of {task.name}/{level.name}",
            f"unknown variables {sorted(unknown)}",
            f"the {task.pool.name!r} pool accepts {sorted(set(model.model_fields) | upstream)}",
        )
    ours = {key: value for key, value in values.items() if key in model.model_fields}
    try:
        model.model_validate(ours)
    except ValidationError as exc:
        raise ParameterError(f"job variables of {task.name}/{level.name}", str(exc)) from exc
    return values


@lru_cache(maxsize=1)
def _upstream_variables() -> frozenset[str]:
    """prefect-kubernetes' own job variables, read from its model (not copied): passed through."""
    from prefect_kubernetes.worker import KubernetesWorkerVariables  # heavy import, only when needed

    return frozenset(KubernetesWorkerVariables.model_fields)


def write_job_templates(
    directory: str | os.PathLike[str], options: dict[str, PoolJobOptions] | None = None
) -> dict[str, Path]:
    """Write each pool's base job template to ``<directory>/<pool>.json`` (for humans and CI)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for pool in POOLS:
        path = target / f"{pool.name}.json"
        template = base_job_template(pool, (options or {}).get(pool.name))
        path.write_text(json.dumps(template, indent=2, sort_keys=True) + "\n")
        written[pool.name] = path
    return written


def _camel(model: BaseModel) -> dict[str, Any]:
    """A model's fields as the chart's values spell them (``cpu_request`` -> ``cpuRequest``)."""
    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part.title() for part in rest)

    return {camel(name): value for name, value in model.model_dump().items()}


def platform_document() -> dict[str, Any]:
    """What the Helm chart reads from ``files/platform.json``: priorities, GPUs, pools, users.

    The chart never repeats a priority or GPU name; ``tests/charts`` checks that the file
    equals this document.
    """
    from taskserver.platform import recovery
    from taskserver.platform.gpus import GPUS
    from taskserver.platform.request_lane import DRAINER_MODULE, ENDPOINT_MODULE
    from taskserver.platform.tasks import WARM_POOL
    from taskserver.platform.wakeup import FALLBACK_POLL_SECONDS

    return {
        "generatedBy": "taskserver.platform.kubernetes.platform_document",
        "priorities": [
            {
                "name": level.name,
                "className": level.priority_class_name,
                "value": level.class_value,
                "preemptionPolicy": level.preemption_policy.value,
                "description": level.description,
                "default": level.name == DEFAULT_PRIORITY,
            }
            for level in PRIORITIES
        ],
        "gpus": [gpu.as_dict() for gpu in GPUS],
        "gpuResource": GPU_RESOURCE,
        "gpuTypeLabel": GPU_TYPE_LABEL,
        # The most GPUs one job or warm pod may request (_validation.tpl; the job variables' bound).
        "maxGpusPerJob": MAX_GPUS_PER_JOB,
        # Each pool's job resources when values.yaml leaves them empty (default_options).
        "pools": [{"name": pool.name, "gpu": pool.gpu, "jobResources": _camel(default_options(pool).resources)}
                  for pool in POOLS],
        # The warm lane's pool: a long-running worker of its own type, not Jobs (chart: warm.*).
        "warmPool": {"name": WARM_POOL.name, "workerType": WARM_POOL.worker_type},
        # Prefect results under the shared data location, as SharedData.env() gives jobs.
        "resultsDirname": RESULTS_DIRNAME,
        # Given to every Prefect client container (taskserver.clientEnv in _helpers.tpl).
        "clientEnv": dict(CLIENT_ENV),
        "runAsUser": RUN_AS_USER,
        "jobOptionsEnv": JOB_OPTIONS_ENV,
        # Code defaults the chart's values leave empty (values.yaml: null = this).
        "defaults": {
            "workerQuerySeconds": FALLBACK_POLL_SECONDS,
            "warmMaxRuns": Settings.model_fields["warm_max_runs"].default,
            "warmMaxRssMB": Settings.model_fields["warm_max_rss_mb"].default,
            "recoveryIntervalSeconds": recovery.DEFAULT_INTERVAL_SECONDS,
            "recoveryMaxAttempts": recovery.DEFAULT_MAX_ATTEMPTS,
            "recoveryLookbackHours": recovery.DEFAULT_LOOKBACK.total_seconds() / 3600,
            "finishedJobTTL": PoolJobOptions.model_fields["finished_job_ttl"].default,
            "podWatchTimeoutSeconds": PoolJobOptions.model_fields["pod_watch_timeout_seconds"].default,
            "kueueLocalQueue": KueueOptions.model_fields["queue_name"].default,
        },
        # The request lane's drainer and endpoint (chart: requestLane.*), from taskserver.settings.
        "requestLane": {
            "port": Settings.model_fields["request_port"].default,
            "databaseUrlEnv": env_name("request_database_url"),
            "threadsEnv": env_name("request_threads"),
            "authStringEnv": env_name("auth_string"),
            "drainerModule": DRAINER_MODULE,
            "endpointModule": ENDPOINT_MODULE,
        },
    }


def write_platform_document(path: str | os.PathLike[str]) -> Path:
    """Regenerate the chart's ``files/platform.json`` from the code."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(platform_document(), indent=2) + "\n")
    return target
