"""Which Prefect server the test process talks to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def use_server(api_url: str) -> Iterator[None]:
    """Point in-process clients (settings context) and child processes (environment) at a server.

    Session-wide servers (``prefect_harness``, the platform server) push their settings when they
    start and stay pushed, so without re-pointing per test, in-process clients follow whichever of
    them started last and a run lands on a server that no worker polls.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    switching = PREFECT_API_URL.value() != api_url
    if switching:
        drain_prefect_workers()
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
            if switching:
                drain_prefect_workers()
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def drain_prefect_workers() -> None:
    """Prefect keeps one events worker and one log worker per process, keyed without the API URL:
    after a switch they would keep sending to the previous server. Drained, they start afresh."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)
