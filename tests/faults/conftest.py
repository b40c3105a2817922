"""Fixtures for the fault tests: the platform fixtures of tests/integration, reused, plus the marker.

The integration conftest is loaded under another module name (two modules cannot both be
``conftest``) and its fixtures re-exported, so both suites start servers, workers and Postgres
the same way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))

_spec = importlib.util.spec_from_file_location("integration_conftest", INTEGRATION / "conftest.py")
_integration = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("integration_conftest", _integration)
_spec.loader.exec_module(_integration)

@pytest.fixture(scope="module")
def platform_server(tmp_path_factory):
    """One server per fault module, stopped when the module ends (a fault test may have
    restarted or starved it)."""
    yield from _integration.serve_platform(tmp_path_factory)


prefect_server = _integration.prefect_server
start_worker = _integration.start_worker
records = _integration.records
postgres_cluster = _integration.postgres_cluster
postgres_url = _integration.postgres_url
clean_queues = _integration.clean_queues


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "faults: fault injection against real servers and workers (killed workers, restarts, SIGTERM)"
    )
