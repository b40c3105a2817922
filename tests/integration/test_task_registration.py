"""A team's task type joins the lanes without a change to taskserver: the example package
(examples/taskserver-keywords) is pip-installed into a directory of its own, put on the path of
every process here (CLI, bootstrap, workers), bootstrapped, and run through `taskserver submit`
on the warm and the job lane and through `prefect deployment run`. The test process itself does
not see the package, so nothing else in the suite does.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from platform_support import (
    BIN, EXAMPLE_PACKAGE as EXAMPLE, base_env, install_example_package, prefect_server_on_postgres, wait_until,
)

TEXTS = ["Queues order the runs by priority, and the workers take the highest priority first.",
         "A warm interpreter keeps the model loaded, so a small request starts in half a second.",
         "Kubernetes Jobs isolate training runs; each Job gets its PriorityClass and its GPU."]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example package, installed by pip into its own folder."""
    return install_example_package(tmp_path_factory.mktemp("site-packages"))


@pytest.fixture(scope="module")
def server(site, tmp_path_factory):
    home = tmp_path_factory.mktemp("registration-server")
    with prefect_server_on_postgres(home) as started:
        yield started


def _env(site, server=None, **extra) -> dict[str, str]:
    env = base_env(PYTHONPATH=str(site), **extra)
    if server is not None:
        env["PREFECT_API_URL"] = server.api_url
    return env


def _cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "taskserver"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _expected(top: int = 5) -> list[list[str]]:
    """The library's answer, computed here from the package's own module (same code as the run)."""
    import sys

    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        from taskserver_keywords.keywords import top_keywords

        return top_keywords(TEXTS, top)
    finally:
        sys.path.remove(str(EXAMPLE / "src"))


def _result(server, run_id: str, storage) -> object:
    """The run's persisted result, read back through Prefect's own result store."""
    import asyncio

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            return await run.state.aresult()

    with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_LOCAL_STORAGE_PATH: str(storage)}):
        return asyncio.run(read())


def test_the_catalogue_lists_the_installed_task_with_its_package(site):
    listed = _cli(_env(site), "tasks")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("extract-keywords"))
    assert row.split()[:6] == ["extract-keywords", "taskserver-keywords", "cpu", "warm,", "job", "yes"]
    assert row.rstrip().endswith("texts, top, input_path, output")
    assert "encode" in listed.stdout  # the built-ins beside it


def test_an_installed_task_runs_at_its_priorities_on_both_lanes_and_fails_bad_input_by_name(site, server, start_worker, tmp_path):
    env = _env(site, server)
    booted = _cli(env, "bootstrap")
    assert booted.returncode == 0, booted.stdout + booted.stderr
    for deployment in ("extract-keywords/critical", "extract-keywords/low", "extract-keywords/high-job"):
        assert f"deployment {deployment!r}" in booted.stdout or deployment in booted.stdout, booted.stdout

    storage = tmp_path / "results"
    worker_env = {"PYTHONPATH": str(site), "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                  "PREFECT_LOCAL_STORAGE_PATH": str(storage)}
    warm = start_worker("warm", slots=1, api_url=server.api_url, env=worker_env)
    start_worker("cpu", slots=1, api_url=server.api_url, env=worker_env)

    texts = json.dumps(TEXTS)
    runs = {}
    for lane, priority in (("warm", "high"), ("job", "low")):
        done = _cli(env, "submit", "extract-keywords", "-p", priority, "--lane", lane, "--param", f"texts={texts}",
                    "--param", "top=4", "--wait", "--timeout", "400", timeout=450)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "state:      Completed" in done.stdout
        runs[lane] = done.stdout.splitlines()[0].strip()
    for lane, run_id in runs.items():
        assert _result(server, run_id, storage) == _expected(top=4), lane
    # The warm interpreter had imported the package's flow before its first run, beside the built-ins.
    preloaded = [line for line in warm.log.read_text().splitlines() if "preloaded flows:" in line]
    assert preloaded and "taskserver_keywords.flow" in preloaded[0] and "taskserver.flows.encode" in preloaded[0]

    # Through Prefect's own CLI too, by the deployment's name, validated by the server.
    prefect_env = _env(site, server)
    started = subprocess.run([str(BIN / "prefect"), "deployment", "run", "extract-keywords/normal",
                              "--param", f"texts={texts}"], env=prefect_env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    from taskserver.platform.submission import status

    from server_context import use_server

    with use_server(server.api_url):
        wait_until(lambda: status(run_id).is_final, timeout=400, what="the prefect-started run to finish")
        assert status(run_id).state_type == "COMPLETED"
    assert _result(server, run_id, storage) == _expected()

    refused = subprocess.run([str(BIN / "prefect"), "deployment", "run", "extract-keywords/normal",
                              "--param", "top=500", "--param", f"texts={texts}"], env=prefect_env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "top" in refused.stdout + refused.stderr


    # Bad input: the run fails, naming the input and why (one worker, one stack: the same test).
    failed = _cli(env, "submit", "extract-keywords", "-p", "critical", "--param", 'texts=["fine words", "   "]',
                  "--wait", "--timeout", "300", timeout=350)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "state:      Failed" in failed.stdout and "texts[1]" in failed.stdout and "blank text" in failed.stdout


def test_an_installed_tasks_critical_runs_start_ahead_of_a_built_in_backlog(site, server, start_worker, tmp_path):
    """One job-lane slot, saturated: built-in `encode` low runs queued first, then the installed
    task at critical. Every critical run must start before any waiting low run."""
    from taskserver.platform.submission import status

    from server_context import use_server

    env = _env(site, server)
    booted = _cli(env, "bootstrap")
    assert booted.returncode == 0, booted.stdout + booted.stderr

    def submit(task: str, priority: str, texts: list[str]) -> str:
        done = _cli(env, "submit", task, "-p", priority, "--lane", "job", "--param", f"texts={json.dumps(texts)}")
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.splitlines()[0].strip()

    low = [submit("encode", "low", [f"backlog text {i}"]) for i in range(3)]
    critical = [submit("extract-keywords", "critical", TEXTS) for _ in range(2)]
    start_worker("cpu", slots=1, api_url=server.api_url, env={"PYTHONPATH": str(site)})

    with use_server(server.api_url):
        wait_until(lambda: all(status(r).is_final for r in low + critical), timeout=600, what="all five runs to finish")
        final = {run_id: status(run_id) for run_id in low + critical}
    assert {s.state_type for s in final.values()} == {"COMPLETED"}, {r: s.message for r, s in final.items()}
    last_critical = max(final[r].start_time for r in critical)
    assert all(last_critical < final[r].start_time for r in low), {r: s.start_time for r, s in final.items()}


def test_an_installed_task_serves_requests_on_the_request_lane(site, postgres_cluster, tmp_path):
    """A real drainer process with the package on its path; requests through `taskserver request submit`."""
    from request_lane_support import DRAINER, LaneProcess

    drainer = LaneProcess(DRAINER, postgres_cluster.url, tmp_path / "drainer.log", {"PYTHONPATH": str(site)}).start()
    try:
        env = _env(site, TASKSERVER_REQUEST_DATABASE_URL=postgres_cluster.url)
        env.pop("PREFECT_API_URL", None)
        done = _cli(env, "request", "submit", "extract-keywords", "-p", "critical", "--param", f"texts={json.dumps(TEXTS)}",
                    "--param", "top=3", "--timeout", "120", timeout=200)
        assert done.returncode == 0, done.stdout + done.stderr
        record = json.loads(done.stdout)
        assert record["state"] == "completed" and record["result"] == {"keywords": _expected(top=3)}
        bad = _cli(env, "request", "submit", "extract-keywords", "--param", 'texts=["fine words", "  "]',
                   "--timeout", "120", timeout=200)
        assert bad.returncode == 1
        failed = json.loads(bad.stdout)
        assert failed["state"] == "failed" and failed["error"]["input"] == "texts[1]" and "blank text" in failed["error"]["reason"]
        refused = _cli(env, "request", "submit", "extract-keywords", "--param", "texts=[\"x\"]", "--param", "top=99")
        assert refused.returncode != 0 and "params.top" in refused.stdout + refused.stderr  # refused before it is queued
    finally:
        drainer.stop()
