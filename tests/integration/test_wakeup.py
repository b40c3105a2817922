"""Workers poll when a run of their pool changes state, not only on their timer.

Each worker here polls every 120 s; without the event stream a run submitted after the worker's
first poll would wait for the next one. With it, the run is picked up as soon as the server
announces it, on both lanes, and the next queued run as soon as a slot frees.
"""

from __future__ import annotations

import pytest

from taskserver.platform.submission import submit
from taskserver.platform.wakeup import concerns_pool

from platform_support import probe_params, read_done, read_starts, wait_until

pytestmark = pytest.mark.usefixtures("clean_queues")

SLOW_POLL = "120"
PICKED_UP_WITHIN = 40.0
"""Far below the 120 s poll (a new process on the job lane starts in ~3-6 s on 2 busy cores)."""


def _ready(worker, marker: str) -> None:
    wait_until(lambda: worker.log.exists() and marker in worker.log.read_text(errors="replace"), 300,
               f"{worker.pool} worker to be ready ({marker!r})")


@pytest.mark.parametrize("lane, pool, ready_marker", [("job", "cpu", "started"), ("warm", "warm", ") ready in")])
def test_a_run_submitted_to_an_idle_worker_starts_long_before_its_next_poll(
        prefect_server, start_worker, records, lane, pool, ready_marker):
    worker = start_worker(pool, slots=1, poll_seconds=SLOW_POLL,
                          env={"TASKSERVER_WARM_PRELOAD": "flows"} if pool == "warm" else None)
    _ready(worker, ready_marker)
    submit("probe", "high", probe_params("first", records, 0.0), lane=lane)
    wait_until(lambda: "first" in read_done(records), PICKED_UP_WITHIN,
               f"the {lane}-lane run to be picked up without waiting for the {SLOW_POLL}s poll")

    # One slot: the second run waits in the queue, and starts as the first run's slot frees.
    submit("probe", "high", probe_params("holder", records, 3.0), lane=lane)
    wait_until(lambda: "holder" in read_starts(records), PICKED_UP_WITHIN, "the slot holder to start")
    submit("probe", "high", probe_params("next", records, 0.0), lane=lane)
    wait_until(lambda: "next" in read_done(records), PICKED_UP_WITHIN + 3,
               "the queued run to start when the slot freed")
    assert read_starts(records)["next"][0]["started"] >= read_done(records)["holder"]["ended"]


class _Event:
    def __init__(self, name: str, related: list[dict]):
        self.event, self.related = name, related


def test_only_state_changes_of_the_workers_own_pool_wake_it():
    mine = [{"prefect.resource.id": "prefect.work-pool.1", "prefect.resource.role": "work-pool",
             "prefect.resource.name": "cpu"}]
    other = [{**mine[0], "prefect.resource.name": "gpu"}]
    assert concerns_pool(_Event("prefect.flow-run.Scheduled", mine), "cpu")
    assert concerns_pool(_Event("prefect.flow-run.Completed", mine), "cpu")
    assert not concerns_pool(_Event("prefect.flow-run.Scheduled", other), "cpu")
    assert not concerns_pool(_Event("prefect.flow-run.heartbeat", mine), "cpu")
    assert not concerns_pool(_Event("prefect.work-pool.ready", mine), "cpu")
