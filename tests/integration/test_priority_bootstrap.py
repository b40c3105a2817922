"""The bootstrap on a real server: exact queue priorities in every pool, and idempotence."""

from __future__ import annotations

from prefect.client.orchestration import get_client

from taskserver.platform.bootstrap import (
    DEFAULT_QUEUE, DEFAULT_QUEUE_PRIORITY, ZOMBIE_AUTOMATION, bootstrap, platform_state, read_queues,
)
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.tasks import ALL_POOLS, DIAGNOSTIC_TASKS

from platform_support import run


async def _queues() -> dict[str, dict[str, int]]:
    async with get_client() as client:
        return {pool.name: {q.name: q.priority for q in await read_queues(client, pool.name)} for pool in ALL_POOLS}


async def _state() -> dict:
    async with get_client() as client:
        return await platform_state(client)


def test_every_pool_has_the_priority_queues_with_exact_priorities(prefect_server):
    wanted = {level.work_queue: level.queue_priority for level in PRIORITIES} | {DEFAULT_QUEUE: DEFAULT_QUEUE_PRIORITY}
    assert run(_queues()) == {pool.name: wanted for pool in ALL_POOLS}


def test_bootstrap_repairs_shifted_priorities_and_a_second_run_changes_nothing(prefect_server):
    async def disturb():
        async with get_client() as client:
            queues = {q.name: q for q in await read_queues(client, "cpu")}
            await client.update_work_queue(queues["low"].id, priority=1)  # shifts the others down

    run(disturb())
    assert run(_queues())["cpu"] != run(_queues())["gpu"]  # disturbed

    first = bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
    assert first.changed
    assert run(_queues())["cpu"] == run(_queues())["gpu"]

    before = run(_state())
    second = bootstrap(extra_tasks=DIAGNOSTIC_TASKS)
    assert not second.changed, second.summary()
    assert run(_state()) == before
    assert ZOMBIE_AUTOMATION in {name for name, _ in before["automations"]}
    assert [name for name, _ in before["automations"]].count(ZOMBIE_AUTOMATION) == 1
