"""Experiment tracking in MLflow: a training run's parameters, per-epoch metrics and model.

Active only with the ``mlflow`` extra installed and ``TASKSERVER_MLFLOW_TRACKING_URI`` set;
otherwise :func:`start_run` returns a tracker whose calls do nothing, so training never depends on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from taskserver.settings import get_settings
from taskserver.training import EpochMetrics

log = logging.getLogger(__name__)

RUN_TAG = "prefect.flow_run_id"
"""Ties an MLflow run to a Prefect flow run, so a rescheduled flow run keeps logging to the same one."""


def available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


class Tracker:
    """No tracking: every call does nothing. :class:`MlflowTracker` does the real work."""

    run_id: str | None = None
    url: str | None = None

    def log_epoch(self, metrics: EpochMetrics) -> None:
        pass

    def log_result(self, metrics: dict[str, float], tags: dict[str, str], model_dir: str | None) -> None:
        pass

    def end(self, failed: bool = False) -> None:
        pass


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 flow_run_id: str | None) -> None:
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3.x refuses its file store unless told to; a file store is what the local stack uses.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{flow_run_id}'", max_results=1
        ) if flow_run_id else []
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={RUN_TAG: flow_run_id} if flow_run_id else None)
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.url = run_url(uri, self.experiment_id, self.run_id,
                           self.client.get_run(self.run_id).info.artifact_uri)

    def _guarded(self, what: str, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - tracking is optional; the training must go on
            log.warning("MLflow: could not %s for run %s (%s: %s)", what, self.run_id, type(exc).__name__, exc)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        self._guarded("log epoch metrics", self._log_epoch, metrics)

    def log_result(self, metrics: dict[str, float], tags: dict[str, str], model_dir: str | None) -> None:
        self._guarded("log the result", self._log_result, metrics, tags, model_dir)

    def end(self, failed: bool = False) -> None:
        self._guarded("end the run", self.client.set_terminated, self.run_id, "FAILED" if failed else "FINISHED")

    def _log_epoch(self, metrics: EpochMetrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in asdict(metrics).items() if k not in ("epoch", "step")}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, metrics.epoch) for k, v in values.items()])

    def _log_result(self, metrics: dict[str, float], tags: dict[str, str], model_dir: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        if model_dir:
            self.client.log_artifacts(self.run_id, model_dir, artifact_path="model")


def run_url(uri: str, experiment_id: str, run_id: str, artifact_uri: str) -> str:
    """Where a person finds the run: the MLflow UI for a server, else the run's folder or database."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith("file:") or "://" not in uri:
        return artifact_uri.rsplit("/", 1)[0]  # <store>/<experiment>/<run>
    return f"{uri} (experiment {experiment_id}, run {run_id})"


def start_run(run_name: str, params: dict[str, Any], flow_run_id: str | None = None) -> Tracker:
    """A tracker for one training run: MLflow when configured and installed, else one that does nothing.

    Tracking problems are logged, never raised: a training run does not fail because MLflow is down."""
    settings = get_settings()
    uri = settings.mlflow_tracking_uri.strip()
    if not uri:
        return Tracker()
    if not available():
        log.warning("TASKSERVER_MLFLOW_TRACKING_URI is set but mlflow is not installed (pip install"
                    " 'taskserver[mlflow]'); this run is not tracked")
        return Tracker()
    try:
        return MlflowTracker(uri, settings.mlflow_experiment, run_name, params, flow_run_id)
    except Exception as exc:  # noqa: BLE001 - tracking is optional; the training must go on
        log.warning("MLflow tracking at %s is not available (%s: %s); this run is not tracked",
                    uri, type(exc).__name__, exc)
        return Tracker()
