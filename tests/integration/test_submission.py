"""Submitting work: the Python API, the taskserver CLI and the plain prefect CLI reach the same queues."""

from __future__ import annotations

import re
import subprocess

import pytest

from taskserver.errors import ParameterError
from taskserver.platform.submission import status, submit, wait_for_async

from platform_support import BIN, base_env, count_runs, read_done, run

pytestmark = pytest.mark.usefixtures("clean_queues")


@pytest.mark.parametrize(
    "task, priority, params, message",
    [
        ("no-such-task", "low", {}, "unknown task"),
        ("probe", "urgent", {"label": "x"}, "unknown priority"),
        ("probe", "low", {"label": "x", "secs": 1}, "not a parameter"),
        ("probe", "low", {"seconds": 1}, "'label' is a required property"),
        ("probe", "low", {"label": "x", "seconds": "soon"}, "is not of type 'number'"),
        ("probe", "low", {"label": "x", "seconds": 10_000}, "maximum"),
    ],
)
def test_bad_submissions_are_refused_before_any_run_exists(prefect_server, task, priority, params, message):
    before = run(count_runs())
    with pytest.raises(ParameterError, match=message):
        submit(task, priority, params)
    assert run(count_runs()) == before


def test_cli_refuses_a_bad_submission_with_a_clear_error(prefect_server):
    before = run(count_runs())
    result = subprocess.run(
        [str(BIN / "taskserver"), "submit", "probe", "--priority", "urgent", "--param", "label=x"],
        env=base_env(PREFECT_API_URL=prefect_server.api_url), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown priority" in result.stderr and "critical, high, normal, low" in result.stderr
    assert run(count_runs()) == before


def test_prefect_deployment_run_as_a_user_types_it_completes_on_the_right_queue(prefect_server, start_worker, records):
    start_worker("cpu", slots=2)
    result = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "probe/high",
         "--param", "label=typed", "--param", f"record_dir={records}", "--param", "seconds=0.2"],
        env=base_env(PREFECT_API_URL=prefect_server.api_url), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout).group(1)
    final = run(wait_for_async(run_id, timeout=180))
    assert final.state_type == "COMPLETED"
    assert (final.work_pool, final.work_queue) == ("cpu", "high")
    assert read_done(records)["typed"]["flow_run_id"] == run_id


def test_submit_and_status_through_the_taskserver_cli(prefect_server, start_worker, records):
    start_worker("cpu", slots=2)
    env = base_env(PREFECT_API_URL=prefect_server.api_url)
    result = subprocess.run(
        [str(BIN / "taskserver"), "submit", "probe", "-p", "critical", "--param", "label=cli",
         "--param", f"record_dir={records}", "--param", "seconds=0", "--wait", "--timeout", "180"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = result.stdout.splitlines()[0].strip()
    shown = subprocess.run([str(BIN / "taskserver"), "status", run_id], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "state:      Completed" in shown.stdout
    assert "queue:      cpu/critical" in shown.stdout
    assert status(run_id).start_time is not None


def test_taskserver_run_executes_a_flow_in_process_without_a_stack(tmp_path):
    env = base_env()
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [str(BIN / "taskserver"), "run", "probe", "--param", "label=inproc", "--param", f"record_dir={tmp_path}",
         "--param", "seconds=0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "inproc.json").exists()
    bad = subprocess.run([str(BIN / "taskserver"), "run", "probe", "--param", "seconds=x"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "label" in bad.stderr
