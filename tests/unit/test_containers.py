"""The container lane's pure parts: what each run's container gets, the template's defaults, and
where the image keeps the code. The lane itself runs for real in tests/integration/test_container_lane.py."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from taskserver.platform.client_env import RESULTS_DIRNAME
from taskserver.platform.containers import (
    HOME_LABEL, IMAGE_CODE_DIR, IMAGE_HOME, PULL_POLICY, apply_run_container, engine_answers, run_container, with_image_defaults,
)

REPO = Path(__file__).resolve().parents[2]


def test_a_runs_container_gets_the_data_location_at_the_same_path_and_the_hosts_ids():
    run = run_container("/srv/data", uid=1000, gid=1001)
    assert run.volumes == ["/srv/data:/srv/data"]
    assert run.user == "1000:1001"
    assert run.env["TASKSERVER_DATA_DIR"] == "/srv/data"
    assert run.env["PREFECT_LOCAL_STORAGE_PATH"] == f"/srv/data/{RESULTS_DIRNAME}"
    assert run.env["TASKSERVER_HOME"] == IMAGE_HOME  # never the worker's host path
    # An object store is reached over the network, not mounted.
    assert run_container("s3://bucket/prefix", 0, 0).volumes == []


def test_what_the_deployment_or_pool_sets_wins_over_the_run_defaults():
    job = SimpleNamespace(env={"TASKSERVER_DATA_DIR": "/elsewhere", "EXTRA": "1", "UNSET": None}, labels={},
                          volumes=["/cache:/srv/data"], container_create_kwargs={"user": "10001:10001"})
    apply_run_container(job, run_container("/srv/data", 0, 0))
    assert job.env["TASKSERVER_DATA_DIR"] == "/elsewhere" and job.env["EXTRA"] == "1"
    assert "UNSET" not in job.env and job.env["PREFECT_HOME"]
    assert job.volumes == ["/cache:/srv/data"]  # a mount already at the target is kept, not doubled
    assert job.container_create_kwargs == {"user": "10001:10001"}

    plain = SimpleNamespace(env={}, volumes=[], container_create_kwargs=None, labels=None)
    apply_run_container(plain, run_container("/srv/data", 5, 6, home="/home/me/.taskserver"))
    assert plain.volumes == ["/srv/data:/srv/data"] and plain.container_create_kwargs == {"user": "5:6"}
    assert plain.labels == {HOME_LABEL: "/home/me/.taskserver"}  # what `taskserver down` stops by


def test_the_pool_template_defaults_to_the_local_image_never_pulled_on_the_host_network():
    template = {"variables": {"properties": {name: {} for name in
                                             ("image", "image_pull_policy", "network_mode", "auto_remove")}}}
    properties = with_image_defaults(template, "localhost/taskserver-cpu:x")["variables"]["properties"]
    assert {name: p["default"] for name, p in properties.items()} == {
        "image": "localhost/taskserver-cpu:x", "image_pull_policy": PULL_POLICY, "network_mode": "host",
        "auto_remove": True}


def test_the_images_keep_the_code_where_the_container_pools_deployments_look():
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        workdirs = re.findall(r"^WORKDIR (\S+)", (REPO / "images" / dockerfile).read_text(), re.M)
        assert workdirs == [IMAGE_CODE_DIR], dockerfile


def test_an_engine_that_is_not_there_does_not_answer(tmp_path):
    assert engine_answers(f"unix://{tmp_path / 'absent.sock'}") is False
