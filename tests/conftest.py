"""Test-wide setup: offline, no telemetry, and a private taskserver home per session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Set before anything imports prefect, unstructured or transformers.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A home of its own for each pytest process: under pytest-xdist the workers inherit the
# controller's environment, so a home this file made in another process is replaced too.
if os.environ.get("TASKSERVER_HOME_MADE_BY") not in (None, str(os.getpid())) or "TASKSERVER_HOME" not in os.environ:
    os.environ["TASKSERVER_HOME"] = tempfile.mkdtemp(prefix="taskserver-test-home-")
    os.environ["TASKSERVER_HOME_MADE_BY"] = str(os.getpid())

# Shared test data makers (pdf_factory) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


_last_api_url: list[str | None] = [None]


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(autouse=True)
def _prefect_clients_follow_the_server():
    """Prefect keeps one events worker per process, keyed without the API URL: after a test
    switches servers it would keep sending events (task runs, heartbeats) to the previous one.
    Drain it whenever the server changes, so each test's events reach its own server."""
    if "prefect" not in sys.modules:
        yield
        return
    from server_context import drain_prefect_workers

    current = _api_url()
    if current != _last_api_url[0]:
        drain_prefect_workers()
        _last_api_url[0] = current
    yield
    if _api_url() != current:
        drain_prefect_workers()


@pytest.fixture(scope="module", autouse=True)
def _torch_threads(request):
    """``pytestmark = pytest.mark.torch_threads(N)``: the module's torch ops use N threads, then the
    count is restored. Fixed counts make results bit-for-bit repeatable and keep a module from
    oversubscribing the 2 cores."""
    marker = request.node.get_closest_marker("torch_threads")
    if marker is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(marker.args[0])
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A private data location: relative paths and caches resolve under ``tmp_path``."""
    from taskserver.settings import reload_settings

    monkeypatch.setenv("TASKSERVER_DATA_DIR", str(tmp_path))
    reload_settings()
    yield tmp_path
    monkeypatch.delenv("TASKSERVER_DATA_DIR")
    reload_settings()


@pytest.fixture(scope="session")
def _harness_api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def prefect_harness(_harness_api_url):
    """A real, temporary Prefect server (SQLite), started once per session and made the client's
    server for this test (the platform server may have been pointed at since)."""
    from server_context import use_server

    with use_server(_harness_api_url):
        yield


LONGEST_FIRST = (
    "tests/integration/test_warm_lane.py", "tests/integration/test_images.py", "tests/charts/test_podman_run.py",
    "tests/faults/test_server_restart.py", "tests/integration/test_container_lane.py",
    "tests/faults/test_lost_worker.py", "tests/faults/test_load.py", "tests/integration/test_request_lane.py",
    "tests/integration/test_priority.py", "tests/faults/test_lost_warm_worker.py",
    "tests/integration/test_localstack.py", "tests/faults/test_preempted_training.py",
    "tests/integration/test_prefect_yaml.py", "tests/integration/test_shared_data.py",
    "tests/faults/test_postgres_outage.py", "tests/integration/test_task_registration.py",
    "tests/faults/test_lost_worker_installed_task.py",
    "tests/integration/test_security.py", "tests/integration/test_ui_in_browser.py", "tests/unit/test_training.py",
)
"""Modules that take minutes, longest first (per-file sums of the test command's --durations,
CI 2026-12-01), handed out first: the two pytest-xdist processes take whole modules in
collection order (``--no-loadscope-reorder``), and one of these started last would run alone
at the end."""


def pytest_collection_modifyitems(config, items):
    """In the full test command, nothing may skip: a skip there would hide a missing install step."""
    config._taskserver_strict_skips = os.environ.get("TASKSERVER_STRICT_SKIPS") == "1"
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))
    order = {id(item): index for index, item in enumerate(items)}

    def key(item):
        relative = Path(str(item.path)).relative_to(root).as_posix() if str(item.path).startswith(str(root)) else ""
        return (rank.get(relative, len(rank)), order[id(item)])

    items.sort(key=key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and getattr(item.config, "_taskserver_strict_skips", False) and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under TASKSERVER_STRICT_SKIPS=1 (the test command installs everything): {reason}"
