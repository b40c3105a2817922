"""Lane routing and the warm pool's lease order, without a server."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace
from uuid import uuid4

import anyio
import pytest

from taskserver.errors import ParameterError
from taskserver.platform.routing import WARM_INPUT_LIMIT_BYTES, choose_lane, deployment_name, input_bytes
from taskserver.platform.tasks import get_task
from taskserver.platform.warm import InterpreterPool


def test_small_encode_goes_warm_and_large_inputs_go_to_jobs(tmp_path):
    assert choose_lane("encode", {"texts": ["one short text"]}) == "warm"
    big = tmp_path / "texts.txt"
    big.write_bytes(b"x" * (WARM_INPUT_LIMIT_BYTES + 1))
    assert input_bytes({"input_path": str(big)}) > WARM_INPUT_LIMIT_BYTES
    assert choose_lane("encode", {"input_path": str(big)}) == "job"
    # Relative paths resolve against the data dir, as the flows resolve them.
    assert choose_lane("encode", {"input_path": "texts.txt"}, data_dir=str(tmp_path)) == "job"
    assert choose_lane("cluster", {"input_path": "x.npz"}) == "job"
    # A big model directory or an existing output file is not input data.
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w" * (WARM_INPUT_LIMIT_BYTES + 1))
    assert choose_lane("infer", {"model_dir": str(model), "texts": ["a ticket"],
                                 "output_path": str(big)}) == "warm"


def test_a_submitter_can_override_the_lane_but_not_put_training_on_it():
    assert choose_lane("encode", {"texts": ["a"]}, "job") == "job"
    assert choose_lane("process-pdfs", {}, "warm") == "warm"
    with pytest.raises(ParameterError, match="only runs on Jobs"):
        choose_lane("train", {}, "warm")
    with pytest.raises(ParameterError, match="unknown lane"):
        choose_lane("encode", {}, "tepid")


def test_deployment_names_follow_the_default_lane():
    assert deployment_name(get_task("encode"), "high", "warm") == "encode/high"
    assert deployment_name(get_task("encode"), "high", "job") == "encode/high-job"
    assert deployment_name(get_task("train"), "low", "job") == "train/low"


class FakeInterpreter(SimpleNamespace):
    alive = True
    runs = 0
    rss_mb = 0.0


def _pool(size: int = 1) -> tuple[InterpreterPool, list[FakeInterpreter]]:
    pool = InterpreterPool(size, {}, max_runs=100, max_rss_mb=1e9, logger=logging.getLogger("test"))
    interpreters = [FakeInterpreter(pid=1000 + i, number=i) for i in range(size)]
    pool._idle.extend(interpreters)
    return pool, interpreters


def test_a_freed_interpreter_goes_to_the_highest_priority_waiter_then_first_come():
    async def scenario() -> list[str]:
        pool, _ = _pool(1)
        order: list[str] = []

        async def job(name: str, priority: int, delay: float) -> None:
            await anyio.sleep(delay)
            async with pool.lease(priority):
                order.append(name)
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as group:
            group.start_soon(job, "first-low", 4, 0)
            group.start_soon(job, "normal-a", 3, 0.01)
            group.start_soon(job, "low", 4, 0.01)
            group.start_soon(job, "normal-b", 3, 0.02)
            group.start_soon(job, "critical", 1, 0.03)
        return order

    assert anyio.run(scenario) == ["first-low", "critical", "normal-a", "normal-b", "low"]


def test_an_announced_higher_priority_run_is_not_overtaken_while_it_gets_ready():
    """A run picked up but still in Prefect's pre-run API calls keeps its place."""

    async def scenario() -> list[str]:
        pool, _ = _pool(1)
        critical = uuid4()
        pool.announce(critical, 1)
        order: list[str] = []

        async def job(name: str, priority: int, run_id, delay: float) -> None:
            await anyio.sleep(delay)
            async with pool.lease(priority, run_id):
                order.append(name)

        async with anyio.create_task_group() as group:
            group.start_soon(job, "low", 4, None, 0)  # asks first, but a critical was announced
            group.start_soon(job, "critical", 1, critical, 0.2)
        return order

    assert anyio.run(scenario) == ["critical", "low"]


def test_waiters_of_the_same_priority_do_not_block_each_other_once_an_announcement_lapses():
    """Regression: two equal-priority waiters each saw the other "ahead" and neither took the
    idle interpreter, forever, after the run announced ahead of them never came."""

    async def scenario() -> list[str]:
        pool, _ = _pool(1)
        ghost = uuid4()
        pool.announce(ghost, 1)  # picked up, then taken by another worker: it never asks
        coming = {ghost}
        pool.still_coming = lambda run_id: run_id in coming
        order: list[str] = []

        async def job(name: str) -> None:
            async with pool.lease(3):
                order.append(name)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(job, "a")
                group.start_soon(job, "b")
                await anyio.sleep(0.2)
                coming.clear()  # the worker's submission of the ghost was aborted
        return order

    assert anyio.run(scenario) == ["a", "b"]


def test_interpreters_are_recycled_by_runs_and_by_memory():
    async def scenario() -> tuple[int, int]:
        pool, (interpreter,) = _pool(1)
        pool.max_runs, pool.max_rss_mb = 2, 500.0
        spawned = []
        pool._spawn = lambda: spawned.append(1)  # no real process in a unit test
        stopped = []

        async def stop() -> None:
            stopped.append(interpreter.pid)

        interpreter.stop = stop
        async with anyio.create_task_group() as group:
            pool._group = group
            pool._idle.clear()  # leased
            interpreter.runs = 1
            pool._give_back(interpreter)  # under both bounds: back to idle
            assert pool._idle == [interpreter]
            pool._idle.clear()
            interpreter.rss_mb = 600.0
            pool._give_back(interpreter)  # over the memory bound: replaced
        return len(spawned), pool.recycled

    assert anyio.run(scenario) == (1, 1)


def test_an_interpreter_that_cannot_start_is_retried_with_back_off_until_it_can(caplog):
    """Real interpreter processes: the first ones die at start-up (PYTHONHOME names no directory)."""
    from taskserver.platform.warm import interpreter_env

    broken = {**interpreter_env(), "PYTHONHOME": "/nonexistent-python-home"}
    pool = InterpreterPool(1, broken, max_runs=100, max_rss_mb=1e9, logger=logging.getLogger("test.warm"))
    failures = lambda: [r.getMessage() for r in caplog.records if "Could not start" in r.getMessage()]  # noqa: E731

    async def scenario() -> int:
        async with anyio.create_task_group() as group:
            await pool.open(group)
            with anyio.fail_after(60):
                while len(failures()) < 2:
                    await anyio.sleep(0.05)
            pool.env.pop("PYTHONHOME")  # the cause goes away: the next attempt starts
            with anyio.fail_after(120):
                async with pool.lease(priority=1) as interpreter:
                    pid = interpreter.pid
                    assert interpreter.alive
            await pool.close()
        return pid

    with caplog.at_level(logging.ERROR, logger="test.warm"):
        pid = anyio.run(scenario)
    assert pid > 0
    first, second = failures()[:2]
    assert first.endswith("retrying in 1s") and second.endswith("retrying in 2s")  # back-off doubles
    assert "(warm interpreter exited with code 1)" in first  # the cause, not a bare "failed"


def test_a_worker_that_is_pid_1_keeps_its_interpreters(tmp_path):
    """In a container the warm worker is pid 1, which a check for "reparented to init" mistook for
    a dead worker: every interpreter exited with code 1 before saying anything. Here the worker
    runs as pid 1 of a new PID namespace (``unshare``, as a container's runtime does) and starts a
    real interpreter, which must get ready."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, anyio\n"
        "from taskserver.platform.warm import Interpreter, interpreter_env\n"
        "async def main():\n"
        "    assert os.getpid() == 1, os.getpid()\n"
        "    interpreter = await Interpreter.start(interpreter_env())\n"
        "    print('ready', interpreter.pid, flush=True)\n"
        "    await interpreter.stop()\n"
        "anyio.run(main)\n"
    )
    env = {**os.environ, "TASKSERVER_WARM_PRELOAD": ""}
    result = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", sys.executable, str(script)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ready "), result.stdout + result.stderr[-3000:]


def test_an_interpreter_whose_worker_is_gone_exits_saying_so():
    from taskserver.platform.warm import WORKER_PID_ENV

    not_the_parent = os.getpid() + 1_000_000  # any pid but the parent's
    env = {**os.environ, "TASKSERVER_WARM_PRELOAD": "", WORKER_PID_ENV: str(not_the_parent)}
    result = subprocess.run([sys.executable, "-m", "taskserver.platform.warm_interpreter"], input="",
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert f"the worker (pid {not_the_parent}) is gone" in result.stderr
    assert result.stdout == ""  # never said "ready"
