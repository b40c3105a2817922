"""The ``train`` and ``infer`` flows on a real Prefect server: a model end to end, and a bad set not retried."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from text_factory import topic_rows, write_rows

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _read(kind: str, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async def read():
        async with get_client() as client:
            if kind == "artifacts":
                return await client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
                )
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    import torch

    torch.set_num_threads(2)


def test_train_then_infer_on_a_real_server(tmp_path):
    from taskserver.flows.infer import infer
    from taskserver.flows.train import train

    data = write_rows(tmp_path / "topics.jsonl", topic_rows(40, seed=0))
    state = train(
        data_path=str(data), output_dir=str(tmp_path / "run"), epochs=2, batch_size=16, max_length=32,
        checkpoint_every=5, validation_fraction=0.25, return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["steps"] == 12 and summary["val_accuracy"] >= 0.8
    assert summary["labels"] == ["cooking", "sports", "weather"]
    model_dir = summary["model_dir"]
    assert Path(model_dir, "taskserver-model.json").is_file()
    artifacts = {a.key: a for a in _read("artifacts", state.state_details.flow_run_id) if a.key}
    assert {"train-curve", "train-summary"} <= set(artifacts)
    curve = json.loads(artifacts["train-curve"].data) if isinstance(artifacts["train-curve"].data, str) \
        else artifacts["train-curve"].data
    assert [row["epoch"] for row in curve] == [1, 2]
    assert all("val_macro_f1" in row and "train_loss" in row for row in curve)

    inline = infer(model_dir=model_dir, texts=["heavy rain and strong winds", "the striker scored twice"],
                   return_state=True)
    assert inline.is_completed(), inline.message
    result = inline.result()
    assert [p["label"] for p in result["predictions"]] == ["weather", "sports"]
    assert result["label_counts"] == {"weather": 1, "sports": 1}

    source = write_rows(tmp_path / "new.jsonl", [{"id": f"r{i}", "text": row["text"]}
                                                 for i, row in enumerate(topic_rows(5, seed=9))])
    from_file = infer(model_dir=model_dir, input_path=str(source), output_path=str(tmp_path / "pred.jsonl"),
                      batch_size=4, return_state=True)
    assert from_file.is_completed(), from_file.message
    written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [row["id"] for row in written] == [f"r{i}" for i in range(15)]
    assert sum(from_file.result()["label_counts"].values()) == 15
    keys = {a.key for a in _read("artifacts", from_file.state_details.flow_run_id)}
    assert "infer-label-counts" in keys


def test_single_class_training_set_fails_naming_the_file_and_is_not_retried(tmp_path):
    from taskserver.flows.train import train

    data = write_rows(tmp_path / "one-class.jsonl", [{"text": f"text {i}", "label": "only"} for i in range(20)])
    state = train(data_path=str(data), output_dir=str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    assert "one-class.jsonl" in state.message and "only one class ('only')" in state.message
    # Prefect 3 records task runs from events, asynchronously: wait (bounded) until the failure shows.
    deadline = time.monotonic() + 30
    while True:
        task_runs = [t for t in _read("task_runs", state.state_details.flow_run_id)
                     if t.name.startswith("fit-classifier") and t.state and t.state.is_final()]
        if task_runs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(task_runs) == 1
    assert task_runs[0].run_count == 1 and task_runs[0].state.is_failed()


def test_missing_model_directory_fails_the_infer_flow_by_name(tmp_path):
    from taskserver.flows.infer import infer

    state = infer(model_dir=str(tmp_path / "no-model"), texts=["hello"], return_state=True)
    assert state.is_failed()
    assert "no-model: model directory not found" in state.message


def test_train_promotes_only_a_better_model_tracks_it_in_mlflow_and_infer_serves_the_champion(
        tmp_path, monkeypatch):
    import hashlib

    from mlflow.tracking import MlflowClient

    from taskserver.flows.infer import infer
    from taskserver.flows.train import train
    from taskserver.settings import reload_settings

    store = tmp_path / "mlruns"
    monkeypatch.setenv("TASKSERVER_MLFLOW_TRACKING_URI", store.as_uri())
    reload_settings()
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(20, seed=0))
    served = tmp_path / "served"
    common = dict(data_path=str(data), model_dir=str(served), epochs=2, batch_size=16, max_length=32,
                  checkpoint_every=100, validation_fraction=0.25, return_state=True)
    try:
        first = train(**common)
        assert first.is_completed(), first.message
        summary = first.result()
        flow_run_id = str(first.state_details.flow_run_id)
        assert summary["model_dir"] == str(served) and summary["promotion"]["promoted"]
        assert summary["promotion"]["champion"] == "v0001"
        assert summary["challenger_dir"] == str(served / "runs" / flow_run_id / "model")
        lineage = json.loads((served / "versions" / "v0001" / "lineage.json").read_text())
        assert lineage["run_id"] == flow_run_id and lineage["mlflow_run_id"] == summary["mlflow_run_id"]
        assert lineage["data_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
        assert lineage["parameters"]["epochs"] == 2 and lineage["metrics"]["val_macro_f1"] >= 0.8

        client = MlflowClient(store.as_uri())
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] == flow_run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1, 2]
        assert "model/classifier_head.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        artifacts = {a.key: a for a in _read("artifacts", first.state_details.flow_run_id) if a.key}
        assert summary["mlflow_run_url"] in artifacts["train-summary"].data
        assert "promoted | yes" in artifacts["train-summary"].data

        second = train(**common)  # the same data and seed: no better, so the champion stays
        assert second.is_completed(), second.message
        kept = second.result()["promotion"]
        assert not kept["promoted"] and kept["champion"] == "v0001" and "stays the champion" in kept["reason"]
        second_summary = {a.key: a for a in _read("artifacts", second.state_details.flow_run_id) if a.key}
        assert "promoted | no: " in second_summary["train-summary"].data

        answer = infer(model_dir=str(served), texts=["the striker scored twice"], return_state=True)
        assert answer.is_completed(), answer.message
        assert answer.result()["model_version"] == "v0001"
        assert answer.result()["predictions"][0]["label"] == "sports"

        two_labels = write_rows(tmp_path / "two.jsonl", [r for r in topic_rows(20, seed=1) if r["label"] != "weather"])
        refused = train(**{**common, "data_path": str(two_labels), "output_dir": str(tmp_path / "refused")})
        assert refused.is_failed()
        assert "two.jsonl: labels (cooking, sports) differ from those of the champion v0001" in refused.message
        assert not (tmp_path / "refused").exists()  # refused before any training
    finally:
        monkeypatch.delenv("TASKSERVER_MLFLOW_TRACKING_URI")
        reload_settings()
