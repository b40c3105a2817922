"""prefect.yaml is generated from the priority model and the task catalogue, and is up to date."""

from __future__ import annotations

from pathlib import Path

import yaml

from taskserver.platform.deployments import code_dir, render_prefect_yaml
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.routing import deployment_name
from taskserver.platform.tasks import JOB_LANE, TASKS, WARM_LANE, WARM_POOL

REPO = Path(__file__).resolve().parents[2]


def _document() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_committed_prefect_yaml_is_what_the_generator_writes():
    assert (REPO / "prefect.yaml").read_text() == render_prefect_yaml(), (
        "prefect.yaml is stale: run `python -m taskserver.platform.deployments`"
    )


def test_one_deployment_per_task_lane_and_priority_in_the_right_pool_and_queue():
    found = {f'{d["flow_name"]}/{d["name"]}': d for d in _document()["deployments"]}
    assert len(found) == sum(len(task.lanes) for task in TASKS) * len(PRIORITIES)
    for task in TASKS:
        for lane in task.lanes:
            for level in PRIORITIES:
                deployment = found[deployment_name(task, level.name, lane)]
                assert deployment["entrypoint"] == task.entrypoint
                assert deployment["work_pool"]["work_queue_name"] == level.work_queue
                assert f"lane:{lane}" in deployment["tags"]
                if lane == JOB_LANE:
                    assert deployment["work_pool"]["name"] == task.pool.name
                    variables = deployment["work_pool"]["job_variables"]
                    assert variables["priority_class_name"] == level.priority_class_name
                    # heartbeats from the flows' hooks, not the engine's 1 s-per-run thread
                    assert variables["env"]["TASKSERVER_RUN_HEARTBEAT_SECONDS"] == "30"
                    assert set(variables["env"]) <= {"TASKSERVER_RUN_HEARTBEAT_SECONDS", "TASKSERVER_STEP_DEPLOYMENTS"}
                else:  # the warm worker emits heartbeats itself and starts no pods
                    assert deployment["work_pool"]["name"] == WARM_POOL.name
                    assert deployment["work_pool"]["job_variables"] == {}


def test_small_request_tasks_default_to_the_warm_lane_and_heavy_ones_stay_on_jobs():
    default_pool = {d["flow_name"]: d["work_pool"]["name"] for d in _document()["deployments"]
                    if d["name"] == "normal"}
    assert default_pool == {"encode": "warm", "process-pdfs": "warm", "infer": "warm",
                            "cluster": "cpu", "train": "gpu", "ingest-documents": "cpu"}
    job_twins = {d["flow_name"]: d["work_pool"]["name"] for d in _document()["deployments"]
                 if d["name"] == "normal-job"}
    assert job_twins == {"encode": "cpu", "process-pdfs": "cpu", "infer": "gpu"}
    assert not [d for d in _document()["deployments"] if d["name"].endswith("-warm")]
    assert {task.name for task in TASKS if WARM_LANE in task.lanes} == set(job_twins)


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


def test_every_deployment_has_its_own_full_name():
    names = [f'{d["flow_name"]}/{d["name"]}' for d in _document()["deployments"]]
    assert len(names) == len(set(names))


def test_descriptions_say_flow_priority_lane_and_how_to_pick_another_priority():
    from taskserver.platform.deployments import deployment_specs

    specs = deployment_specs()
    for spec in specs:
        text = spec.description
        assert text.startswith(f"{spec.flow_name}: "), text
        assert f"Priority {spec.priority.name} (queue {spec.work_queue_name})" in text, text
        assert f"{spec.lane.capitalize()} lane (pool {spec.pool.name})" in text, text
        assert "For another priority run its deployment" in text and "<" not in text, text
    by_name = {spec.full_name: spec.description for spec in specs}
    assert by_name["encode/high"] != by_name["encode/high-job"]
    assert len(set(by_name.values())) == len(by_name)


def test_a_pipelines_deployments_name_its_steps_at_their_own_priority_on_the_job_lane():
    """The ingest pipeline learns where its steps run from its deployment (the flows layer does
    not import the platform's naming): each named step deployment exists, at the same level."""
    import json

    from taskserver.platform.deployments import STEP_DEPLOYMENTS_ENV, deployment_specs
    from taskserver.settings import Settings

    specs = deployment_specs()
    names = {spec.full_name: spec for spec in specs}
    pipelines = [spec for spec in specs if spec.task.steps]
    assert {spec.task.name for spec in pipelines} == {"ingest-documents"}
    for spec in pipelines:
        raw = spec.job_variables["env"][STEP_DEPLOYMENTS_ENV]
        steps = Settings(step_deployments=json.loads(raw)).step_deployments
        assert set(steps) == set(spec.task.steps)
        for step, name in steps.items():
            target = names[name]
            assert (target.task.name, target.priority, target.lane) == (step, spec.priority, JOB_LANE)
    others = [spec for spec in specs if not spec.task.steps and spec.lane == JOB_LANE]
    assert others and all(STEP_DEPLOYMENTS_ENV not in spec.job_variables["env"] for spec in others)


def test_a_pipeline_run_outside_its_deployments_says_it_cannot_run_steps_as_runs(monkeypatch):
    from taskserver.errors import ParameterError
    from taskserver.flows.ingest import _step_deployment
    from taskserver.settings import reload_settings

    monkeypatch.delenv("TASKSERVER_STEP_DEPLOYMENTS", raising=False)
    reload_settings()
    try:
        _step_deployment("encode")
    except ParameterError as error:
        assert "steps_as_runs" in str(error) and "ingest-documents/<priority>" in str(error)
    else:
        raise AssertionError("no error without step deployments")
    monkeypatch.setenv("TASKSERVER_STEP_DEPLOYMENTS", '{"encode": "encode/low-job"}')
    reload_settings()
    assert _step_deployment("encode") == "encode/low-job"
    monkeypatch.delenv("TASKSERVER_STEP_DEPLOYMENTS")
    reload_settings()
