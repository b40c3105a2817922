"""One typed settings object for taskserver, read from the environment (prefix ``TASKSERVER_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKSERVER_", extra="ignore")

    home: Path = Field(
        default=Path.home() / ".taskserver",
        description="State of the local stack: server database, logs, pid files.",
    )
    data_dir: str = Field(
        default="",
        description=(
            "Shared data location for inputs, outputs, checkpoints and results: a local path or an"
            " fsspec URL (s3://bucket/prefix). Relative paths in flow parameters resolve against it."
            " Defaults to <home>/data."
        ),
    )
    embedding_batch_size: int = Field(default=64, ge=1, description="Texts per encoder forward pass.")
    pdf_workers: int = Field(
        default=0, ge=0, description="Processes used to partition PDFs; 0 means one per CPU core."
    )
    notify_webhook_url: SecretStr = Field(
        default=SecretStr(""),
        description=(
            "Webhook that `taskserver bootstrap` wires to Failed and Crashed flow runs (a Prefect"
            " Webhook block plus automations). Empty: no notifications, and bootstrap removes them."
            " A secret: it is never printed in full."
        ),
    )
    auth_string: SecretStr = Field(
        default=SecretStr(""),
        description=(
            "Basic-auth credentials, as user:password, that `taskserver up` requires on the local"
            " stack's API and hands to its workers and to the CLI. Empty: no authentication (the API"
            " listens on 127.0.0.1 only). A secret: it is never printed or written to the home."
        ),
    )
    notify_completed: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Deployments, as <flow>/<priority> (comma-separated in the environment), whose Completed"
            " runs also call the webhook."
        ),
    )

    step_deployments: dict[str, str] = Field(
        default_factory=dict,
        description="For a pipeline run (ingest-documents with steps_as_runs): the deployment each"
        " step task runs as, e.g. {\"encode\": \"encode/high-job\"}. Its deployments set it"
        " (platform.deployments), so the flows need not know the platform's naming.",
    )
    run_heartbeat_seconds: int = Field(
        default=0, ge=0,
        description="A flow run emits a heartbeat this often from its own hooks"
        " (taskserver.flows.heartbeats); 0: it emits none. The job lane's deployments set 30; on"
        " the warm lane the worker emits them.",
    )
    wake_on_run_events: bool = Field(
        default=True,
        description="Workers poll the moment a run of their pool changes state (the server's event"
        " stream) besides their timed poll; false: the timed poll only.",
    )
    warm_interpreters: int = Field(
        default=0, ge=0,
        description="Interpreters a warm-lane worker keeps (its run slots); 0 means the worker's"
        " --limit, else 2.",
    )
    warm_max_runs: int = Field(
        default=200, ge=1, description="A warm interpreter is replaced after this many runs."
    )
    warm_max_rss_mb: float = Field(
        default=2048, gt=0,
        description="A warm interpreter is replaced once its resident memory passes this (MB).",
    )
    warm_preload: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["encoder", "pdf", "flows"],
        description="What warm interpreters load before their first run: encoder, pdf, flows"
        " (comma-separated in the environment).",
    )
    warm_threads: int = Field(
        default=0, ge=0,
        description="Torch threads per warm-lane run; 0: a run alone on its worker gets every core, runs"
        " that start beside others share them.",
    )

    mlflow_tracking_uri: str = Field(
        default="",
        description=(
            "MLflow tracking URI (file:///path, sqlite:///path, http://host:5000) that training runs"
            " log parameters, per-epoch metrics and the model to; needs the `mlflow` extra. Empty: no"
            " tracking. `taskserver up` sets file://<home>/mlruns when the extra is installed."
        ),
    )
    mlflow_experiment: str = Field(
        default="taskserver-train", description="MLflow experiment that training runs are logged under."
    )

    request_database_url: SecretStr = Field(
        default=SecretStr(""),
        description="PostgreSQL that holds the request lane's queue (schema taskserver_requests), as"
        " postgresql://user:password@host:port/db. Empty: the local stack's embedded PostgreSQL in"
        " <home>/postgres. A secret: it is never printed in full.",
    )
    request_port: int = Field(
        default=4300, ge=1, le=65535, description="Port of the request lane's HTTP endpoint on 127.0.0.1."
    )
    request_batch_size: int = Field(
        default=64, ge=1, le=4096, description="Most requests one drainer batch (one model call) takes."
    )
    request_batch_max_texts: int = Field(
        default=256, ge=1,
        description="Most texts one batch takes (its head request always fits): bounds how long a batch"
        " holds the model, so urgent requests never wait long behind one.",
    )
    request_batch_window_ms: float = Field(
        default=5, ge=0, le=1000,
        description="A batch that is not full waits this long once for more compatible requests.",
    )
    request_threads: int = Field(
        default=0, ge=0,
        description="Torch threads for the drainer's model calls. 0: OMP_NUM_THREADS when it is set,"
        " else every CPU this process may run on. The chart sets it from the drainer's CPU limit.",
    )
    request_lease_seconds: float = Field(
        default=30, gt=0,
        description="A drainer holds a claimed request this long and renews it while it works; a"
        " request whose lease runs out (its drainer died) goes back to the queue.",
    )
    request_max_attempts: int = Field(
        default=3, ge=1, description="Claims a request gets before it fails as lost (each lost drainer is one)."
    )
    request_max_texts: int = Field(
        default=256, ge=1, description="Most texts one request may carry; more are refused by name."
    )
    request_max_bytes: int = Field(
        default=2_000_000, ge=1024, description="Largest request parameters, as JSON bytes; larger ones are refused."
    )
    request_retention_hours: float = Field(
        default=168, gt=0,
        description="Finished requests (results and errors) are kept this long, then deleted by the"
        " drainer's cleanup (`taskserver request cleanup` runs it at once).",
    )
    request_prefect_records: bool = Field(
        default=True,
        description="The drainer records each batch as a Prefect flow run with one task run per request"
        " (when a Prefect API is configured).",
    )

    pool_limits: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Concurrency limits per work pool that `taskserver bootstrap` sets, as NAME=N items"
        " (comma-separated in the environment, e.g. cpu=4,gpu=1; none: unlimited). Unset pools keep"
        " the catalogue's defaults.",
    )
    queue_limits: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Concurrency limits per priority queue that `taskserver bootstrap` sets, as"
        " POOL/PRIORITY=N items (e.g. cpu/low=2; none: unlimited).",
    )
    k8s_job_options: str = Field(
        default="",
        description="JSON file with each pool's Kubernetes job options (image, resources, node"
        " selector, tolerations), keyed by pool name; the chart mounts it from its workers values."
        " Empty, or a pool missing from it: the built-in defaults.",
    )
    container_image: str = Field(
        default="localhost/taskserver-cpu:latest",
        description="The image `taskserver up --containers` runs job-lane flow runs in (built from"
        " images/Dockerfile.cpu; never pulled). A deployment's job variables may name another.",
    )
    code_dir: str = Field(
        default="",
        description="Where the flows' entrypoints (src/taskserver/flows/...) resolve from when a"
        " deployment's run starts. Empty: the checkout this package was installed from, else the"
        " current directory.",
    )

    @field_validator("notify_completed", "warm_preload", "pool_limits", "queue_limits", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # The environment gives "encode/high,train/low"; Python callers may pass a list.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def data_location(self) -> str:
        return self.data_dir or str(self.home / "data")


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (e.g. ``TASKSERVER_RUN_HEARTBEAT_SECONDS``)."""
    if field not in Settings.model_fields:
        raise KeyError(f"no setting named {field!r}")
    return f"{Settings.model_config['env_prefix']}{field.upper()}"


def get_settings() -> Settings:
    """The settings for the environment as it is now.

    Parsed once per distinct set of ``TASKSERVER_*`` variables, so a change to the environment
    (the CLI's options, a test's monkeypatch, a warm interpreter taking a run's variables) is seen
    by the next call and never by a stale copy.
    """
    prefix = Settings.model_config["env_prefix"]
    return _settings_for(tuple(sorted(
        (name, value) for name, value in os.environ.items() if name.upper().startswith(prefix)
    )))


@lru_cache(maxsize=8)
def _settings_for(environment: tuple[tuple[str, str], ...]) -> Settings:
    # ``environment`` is the cache key only: Settings() reads the same variables itself.
    return Settings()


def reload_settings() -> Settings:
    """Re-read the environment now (kept for callers that changed it; get_settings sees it too)."""
    _settings_for.cache_clear()
    return get_settings()
