"""MLflow tracking against a real local file store: parameters, per-epoch metrics, the model, one
run per Prefect flow run; and nothing at all without a tracking URI."""

from __future__ import annotations

import pytest

from taskserver import tracking
from taskserver.settings import reload_settings
from taskserver.training import EpochMetrics


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("TASKSERVER_MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("TASKSERVER_MLFLOW_EXPERIMENT", "unit")
    reload_settings()
    yield store
    monkeypatch.delenv("TASKSERVER_MLFLOW_TRACKING_URI")
    monkeypatch.delenv("TASKSERVER_MLFLOW_EXPERIMENT")
    reload_settings()


def _epoch(n: int, f1: float) -> EpochMetrics:
    return EpochMetrics(epoch=n, step=6 * n, train_loss=1.0 / n, val_loss=0.5 / n, val_accuracy=f1,
                        val_macro_f1=f1, seconds=1.5)


def test_a_run_logs_parameters_epoch_metrics_and_the_model_to_the_file_store(file_store, tmp_path):
    from mlflow.tracking import MlflowClient

    model = tmp_path / "model"
    model.mkdir()
    (model / "taskserver-model.json").write_text("{}")
    tracker = tracking.start_run("train nightly", {"epochs": 2, "learning_rate": 1e-4}, flow_run_id="flow-1")
    assert isinstance(tracker, tracking.MlflowTracker) and tracker.run_id
    tracker.log_epoch(_epoch(1, 0.5))
    tracker.log_epoch(_epoch(2, 0.75))
    tracker.log_result({"best_val_macro_f1": 0.75}, {"promoted": "True"}, str(model))
    tracker.end()

    client = MlflowClient(file_store.as_uri())
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train nightly"
    assert run.data.params == {"epochs": "2", "learning_rate": "0.0001"}
    assert run.data.tags[tracking.RUN_TAG] == "flow-1" and run.data.tags["promoted"] == "True"
    history = client.get_metric_history(tracker.run_id, "val_macro_f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/taskserver-model.json"]
    assert tracker.url and tracker.url.endswith(tracker.run_id) and str(file_store) in tracker.url

    # The same flow run (rescheduled after an eviction) continues the same MLflow run.
    again = tracking.start_run("train nightly", {"epochs": 2}, flow_run_id="flow-1")
    assert again.run_id == tracker.run_id
    assert tracking.start_run("train other", {}, flow_run_id="flow-2").run_id != tracker.run_id


def test_without_a_tracking_uri_nothing_is_tracked(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKSERVER_MLFLOW_TRACKING_URI", raising=False)
    reload_settings()
    tracker = tracking.start_run("train", {"epochs": 1}, flow_run_id="x")
    assert type(tracker) is tracking.Tracker and tracker.run_id is None and tracker.url is None
    tracker.log_epoch(_epoch(1, 0.5))  # does nothing, raises nothing
    tracker.end()


def test_an_unreachable_tracking_server_does_not_stop_training(monkeypatch, caplog):
    monkeypatch.setenv("TASKSERVER_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reload_settings()
    try:
        tracker = tracking.start_run("train", {"epochs": 1})
    finally:
        monkeypatch.delenv("TASKSERVER_MLFLOW_TRACKING_URI")
        reload_settings()
    assert type(tracker) is tracking.Tracker
    assert "not available" in caplog.text and "this run is not tracked" in caplog.text
