"""Settings every Prefect client of the platform gets: workers, flow-run processes and pods, the
recovery service and the CLI. One place, so the local stack, the job templates and the chart
(through files/platform.json) cannot drift.
"""

from __future__ import annotations

import os

CLIENT_ENV: dict[str, str] = {
    # Prefect 3.8.8's server answers 503 (which clients retry with back-off, ~62 s in all) only
    # for database errors it classes as retryable; with Postgres down, asyncpg's refused
    # connection surfaces as a 500, which clients do not retry, and a run finishing during the
    # outage stayed Running for good (tests/faults/test_postgres_outage.py). Retrying 500s too
    # lets every client ride out a database restart.
    "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
}


RESULTS_DIRNAME = "prefect-results"
"""Prefect's persisted results live in this folder of the shared data location."""


def prefect_results_env(data_location: str) -> dict[str, str]:
    """Environment that puts Prefect's persisted results under the shared data location."""
    return {
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": os.path.join(data_location, RESULTS_DIRNAME),
    }
