"""The recovery service's heartbeat file: touched after every pass, the failed ones it survives
included, so the chart's liveness probe (an mtime check) restarts only a loop that stopped."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from taskserver.platform.recovery import main, serve

pytestmark = pytest.mark.timeout(300)


def test_one_pass_against_a_real_server_touches_the_file(prefect_harness, tmp_path) -> None:
    heartbeat = tmp_path / "heartbeat"
    asyncio.run(serve(once=True, heartbeat_file=heartbeat))
    assert heartbeat.exists()
    old = time.time() - 3600
    os.utime(heartbeat, (old, old))
    main(["--once", "--heartbeat-file", str(heartbeat)])  # the chart's command line
    assert time.time() - heartbeat.stat().st_mtime < 60


def test_each_failed_but_handled_pass_touches_it_and_an_unhandled_one_does_not(tmp_path) -> None:
    heartbeat = tmp_path / "heartbeat"
    unreachable = "http://127.0.0.1:9/api"  # nothing listens on the discard port

    async def passes(count: int) -> list[float]:
        seen: list[float] = []
        task = asyncio.create_task(serve(interval=0.05, heartbeat_file=heartbeat))
        try:
            deadline = time.monotonic() + 120
            while len(seen) < count and time.monotonic() < deadline and not task.done():
                if heartbeat.exists() and (not seen or heartbeat.stat().st_mtime_ns != seen[-1]):
                    seen.append(heartbeat.stat().st_mtime_ns)
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return seen

    with temporary_settings(updates={PREFECT_API_URL: unreachable}):
        assert len(asyncio.run(passes(3))) == 3, "the loop stopped touching the file after failed passes"
        heartbeat.unlink()
        with pytest.raises(Exception):
            asyncio.run(serve(once=True, heartbeat_file=heartbeat))
        assert not heartbeat.exists(), "a pass that failed and ended the service still touched the file"
