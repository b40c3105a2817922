"""prefect.yaml is generated from the priority model and the task catalogue, and is up to date."""

from __future__ import annotations

from pathlib import Path

import yaml

from taskserver.platform.deployments import code_dir, render_prefect_yaml
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]


def _document() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_committed_prefect_yaml_is_what_the_generator_writes():
    assert (REPO / "prefect.yaml").read_text() == render_prefect_yaml(), (
        "prefect.yaml is stale: run `python -m taskserver.platform.deployments`"
    )


def test_one_deployment_per_task_and_priority_in_the_right_pool_and_queue():
    found = {(d["flow_name"], d["name"]): d for d in _document()["deployments"]}
    assert len(found) == len(TASKS) * len(PRIORITIES)
    for task in TASKS:
        for level in PRIORITIES:
            deployment = found[(task.name, level.name)]
            assert deployment["entrypoint"] == task.entrypoint
            assert deployment["work_pool"]["name"] == task.pool.name
            assert deployment["work_pool"]["work_queue_name"] == level.work_queue
            assert deployment["work_pool"]["job_variables"]["priority_class_name"] == level.priority_class_name


def test_training_and_inference_go_to_the_gpu_pool_and_the_rest_to_cpu():
    pools = {d["flow_name"]: d["work_pool"]["name"] for d in _document()["deployments"]}
    assert {name for name, pool in pools.items() if pool == "gpu"} == {"train", "infer"}
    assert {name for name, pool in pools.items() if pool == "cpu"} == {
        "encode", "process-pdfs", "cluster", "ingest-documents"}


def test_only_schedule_is_an_inactive_nightly_retrain():
    scheduled = [d for d in _document()["deployments"] if d.get("schedules")]
    assert [(d["flow_name"], d["name"]) for d in scheduled] == [("train", "low")]
    assert all(s["active"] is False for s in scheduled[0]["schedules"])


def test_deploys_offline_without_build_or_push_and_pulls_by_working_directory():
    document = _document()
    assert document["build"] is None and document["push"] is None
    (step,) = document["pull"]
    assert "prefect.deployments.steps.set_working_directory" in step


def test_entrypoints_resolve_against_the_checkout():
    assert (code_dir() / "src" / "taskserver" / "__init__.py").exists()
