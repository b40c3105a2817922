"""Test-wide setup: offline, no telemetry, and a private taskserver home per session."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports prefect, unstructured or transformers.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if "TASKSERVER_HOME" not in os.environ:
    os.environ["TASKSERVER_HOME"] = tempfile.mkdtemp(prefix="taskserver-test-home-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
