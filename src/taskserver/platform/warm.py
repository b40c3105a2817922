"""The warm lane: a Prefect worker type that runs flow runs inside interpreters it keeps warm.

A stock worker pays for a fresh process per run: ~2 s importing Prefect, the libraries and the
model, ~1.5 s more before the slot frees. This worker keeps ``limit`` interpreters alive
(``taskserver.platform.warm_interpreter``) with Prefect, torch and the embedding model loaded,
and hands each flow run to a free one. Each run is still a normal Prefect flow run, executed by
Prefect's own engine (``prefect.flow_engine.run_flow``): same states, logs, artifacts, results.

Isolation and bounds: an interpreter is a separate process, so a run that segfaults or is
killed takes only its interpreter down; the run is marked Crashed exactly as the stock process
worker does, and a fresh interpreter replaces it. An interpreter is recycled after
``TASKSERVER_WARM_MAX_RUNS`` runs or once its RSS passes ``TASKSERVER_WARM_MAX_RSS_MB``.

Heartbeats: the runs' own heartbeat thread costs ~1 s at the end of every run (it sleeps in
1 s steps and is joined), so interpreters run without it: each run's first
``prefect.flow-run.heartbeat`` comes from an ``on_running`` hook in its interpreter, the
following ones from this worker, every 30 s. The zombie automation works
as on the job lane: if the worker dies, its interpreters die with it and the heartbeats stop.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable
from uuid import UUID

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from prefect.client.schemas.objects import FlowRun
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from tenacity import AsyncRetrying, RetryCallState, wait_exponential

from taskserver.flows.heartbeats import HEARTBEAT_SECONDS, RUN_HEARTBEAT_ENV, emit_run_heartbeat
from taskserver.platform.queue_order import UNKNOWN_QUEUE_PRIORITY, QueuePriorityMixin
from taskserver.platform.tasks import WARM_WORKER_TYPE
from taskserver.platform.wakeup import WakeOnRunEvents
from taskserver.settings import get_settings

WORKER_TYPE = WARM_WORKER_TYPE
READY_TIMEOUT_SECONDS = 600.0
STOP_GRACE_SECONDS = 10.0
MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_INTERPRETERS = 2
ANNOUNCE_TTL_SECONDS = 30.0

_INTERPRETER_MODULE = "taskserver.platform.warm_interpreter"
WORKER_PID_ENV = "TASKSERVER_WARM_WORKER_PID"
"""Where a worker tells its interpreters its pid: each exits if its parent is another (the
worker died before the interpreter asked the kernel to be killed with it)."""


class WarmJobConfiguration(BaseJobConfiguration):
    """Only ``env`` matters: it is applied around the run inside the interpreter.

    Prefect settings (``PREFECT_*``) are per interpreter and come from the worker's
    environment; a deployment cannot change them per run on this lane.
    """


class WarmVariables(BaseVariables):
    pass


class WarmWorkerResult(BaseWorkerResult):
    pass


class InterpreterLost(Exception):
    """The interpreter exited (crash, kill, out of memory) while it held a run."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"warm interpreter exited with code {returncode}")
        self.returncode = returncode


@dataclass
class Outcome:
    state: str
    seconds: float
    rss_mb: float


class Interpreter:
    """One warm interpreter process: JSON commands on its stdin, JSON replies on its stdout."""

    _ids = itertools.count(1)

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.number = next(self._ids)
        self.runs = 0
        self.rss_mb = 0.0
        self.warm_seconds = 0.0
        assert process.stdout is not None and process.stdin is not None
        self._replies = BufferedByteReceiveStream(process.stdout)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @classmethod
    async def start(cls, env: dict[str, str]) -> "Interpreter":
        process = await anyio.open_process(
            [sys.executable, "-m", _INTERPRETER_MODULE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            env={**env, WORKER_PID_ENV: str(os.getpid())},
        )
        interpreter = cls(process)
        with anyio.fail_after(READY_TIMEOUT_SECONDS):
            ready = await interpreter._receive()
        if ready.get("event") != "ready":
            raise RuntimeError(f"warm interpreter sent {ready!r} instead of 'ready'")
        interpreter.rss_mb = ready.get("rss_mb", 0.0)
        interpreter.warm_seconds = ready.get("seconds", 0.0)
        return interpreter

    async def _receive(self) -> dict[str, Any]:
        try:
            line = await self._replies.receive_until(b"\n", MAX_MESSAGE_BYTES)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            raise InterpreterLost(await self.process.wait()) from None
        return json.loads(line)

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send((json.dumps(message) + "\n").encode())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError):
            raise InterpreterLost(await self.process.wait()) from None

    async def execute(self, flow_run_id: UUID, env: dict[str, str | None], threads: int = 0) -> Outcome:
        """Run the flow run; ``threads`` (if set) is the torch thread count for this run."""
        self.runs += 1
        await self._send({"op": "run", "flow_run_id": str(flow_run_id), "env": env, "threads": threads})
        while True:
            reply = await self._receive()
            if reply.get("event") == "finished" and reply.get("flow_run_id") == str(flow_run_id):
                self.rss_mb = reply.get("rss_mb", self.rss_mb)
                return Outcome(reply.get("state", "UNKNOWN"), reply.get("seconds", 0.0), self.rss_mb)

    async def stop(self) -> None:
        if not self.alive:
            return
        try:
            await self._send({"op": "exit"})
        except InterpreterLost:
            return
        with anyio.move_on_after(STOP_GRACE_SECONDS):
            await self.process.wait()
            return
        self.kill()
        await self.process.wait()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass


@dataclass(order=True)
class _Waiter:
    priority: int
    sequence: int
    event: anyio.Event = field(compare=False, default_factory=anyio.Event)
    interpreter: Interpreter | None = field(compare=False, default=None)


class InterpreterPool:
    """``size`` warm interpreters, leased highest queue priority first, then first come."""

    def __init__(self, size: int, env: dict[str, str], max_runs: int, max_rss_mb: float, logger) -> None:
        self.size = size
        self.env = env
        self.max_runs = max_runs
        self.max_rss_mb = max_rss_mb
        self.logger = logger
        self.busy: dict[int, Interpreter] = {}
        self.recycled = 0
        self._idle: list[Interpreter] = []
        self._waiters: list[_Waiter] = []
        self._sequence = itertools.count()
        self._group: anyio.abc.TaskGroup | None = None
        self._starting = 0
        self._announced: dict[UUID, tuple[int, float]] = {}
        self.still_coming: Callable[[UUID], bool] = lambda run_id: True
        """Whether an announced run is still on its way to ``lease`` (the worker knows)."""

    async def open(self, group: anyio.abc.TaskGroup) -> None:
        self._group = group
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        assert self._group is not None
        self._starting += 1
        self._group.start_soon(self._start_one)

    async def _start_one(self) -> None:
        def report(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.logger.error(f"Could not start a warm interpreter ({error}); retrying in {wait:.0f}s")

        # e.g. the machine is out of memory: keep trying, slower (1 s doubling to a minute)
        retrying = AsyncRetrying(wait=wait_exponential(multiplier=1, min=1, max=60), before_sleep=report,
                                 sleep=anyio.sleep, reraise=True)
        interpreter = await retrying(Interpreter.start, self.env)
        self._starting -= 1
        self.logger.info(
            f"Warm interpreter {interpreter.number} (pid {interpreter.pid}) ready in"
            f" {interpreter.warm_seconds:.1f}s, {interpreter.rss_mb:.0f} MB"
        )
        self._release_to_next(interpreter)

    def announce(self, run_id: UUID, priority: int) -> None:
        """A run was picked up and will ask for an interpreter once Prefect has marked it Pending.

        Until it asks (or ANNOUNCE_TTL_SECONDS pass), no lower-priority run takes an interpreter
        ahead of it: the API calls before ``run()`` vary in length, and must not reorder runs.
        """
        self._announced[run_id] = (priority, time.monotonic() + ANNOUNCE_TTL_SECONDS)

    def _best_announced(self, exclude: UUID | None = None) -> int:
        now = time.monotonic()
        for run_id, (_, expires) in list(self._announced.items()):
            if expires < now or not self.still_coming(run_id):
                del self._announced[run_id]
        return min((p for r, (p, _) in self._announced.items() if r != exclude),
                   default=UNKNOWN_QUEUE_PRIORITY + 1)

    def _best_waiter(self) -> _Waiter | None:
        while self._waiters and self._waiters[0].event.is_set():  # gave up meanwhile
            heapq.heappop(self._waiters)
        return self._waiters[0] if self._waiters else None

    def _release_to_next(self, interpreter: Interpreter) -> None:
        waiter = self._best_waiter()
        if waiter is not None and waiter.priority <= self._best_announced():
            heapq.heappop(self._waiters)
            waiter.interpreter = interpreter
            waiter.event.set()
            return
        self._idle.append(interpreter)

    @asynccontextmanager
    async def lease(self, priority: int, run_id: UUID | None = None) -> AsyncIterator[Interpreter]:
        interpreter = await self._acquire(priority, run_id)
        self.busy[interpreter.pid] = interpreter
        try:
            yield interpreter
        finally:
            self.busy.pop(interpreter.pid, None)
            self._give_back(interpreter)

    async def _acquire(self, priority: int, run_id: UUID | None = None) -> Interpreter:
        if run_id is not None:
            self._announced.pop(run_id, None)
        sequence = next(self._sequence)  # kept across re-checks: first come, first served
        while True:
            waiter = self._best_waiter()
            if self._idle and (waiter is None or (waiter.priority, waiter.sequence) > (priority, sequence)) \
                    and self._best_announced() >= priority:
                return self._idle.pop()
            waiter = _Waiter(priority, sequence)
            heapq.heappush(self._waiters, waiter)
            try:
                # Re-checked now and then: an announced run that never asks expires.
                with anyio.move_on_after(ANNOUNCE_TTL_SECONDS / 10):
                    await waiter.event.wait()
            except BaseException:
                if waiter.interpreter is not None:  # handed over just as we were cancelled
                    self._release_to_next(waiter.interpreter)
                waiter.event.set()
                raise
            if waiter.interpreter is not None:
                return waiter.interpreter
            waiter.event.set()  # withdraw, then look again

    def _give_back(self, interpreter: Interpreter) -> None:
        if not interpreter.alive:
            self.logger.warning(
                f"Warm interpreter {interpreter.number} exited (code {interpreter.process.returncode});"
                " starting a replacement"
            )
            self._spawn()
            return
        reason = None
        if interpreter.runs >= self.max_runs:
            reason = f"{interpreter.runs} runs"
        elif interpreter.rss_mb >= self.max_rss_mb:
            reason = f"{interpreter.rss_mb:.0f} MB >= {self.max_rss_mb:.0f} MB"
        if reason is None:
            self._release_to_next(interpreter)
            return
        self.recycled += 1
        self.logger.info(f"Recycling warm interpreter {interpreter.number} after {reason}")
        assert self._group is not None
        self._group.start_soon(interpreter.stop)
        self._spawn()

    def find(self, pid: int) -> Interpreter | None:
        return self.busy.get(pid)

    async def close(self) -> None:
        everyone = [*self._idle, *self.busy.values()]
        self._idle.clear()
        async with anyio.create_task_group() as group:
            for interpreter in everyone:
                group.start_soon(interpreter.stop)


def interpreter_env(base: dict[str, str] | None = None, threads: int = 1) -> dict[str, str]:
    """The interpreters' environment: the worker's, without the per-run heartbeat thread."""
    env = dict(os.environ if base is None else base)
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    env.pop(RUN_HEARTBEAT_ENV, None)  # this worker sends the heartbeats after the first
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WarmWorker(WakeOnRunEvents, QueuePriorityMixin,
                 BaseWorker[WarmJobConfiguration, WarmVariables, WarmWorkerResult]):
    """Runs flow runs in warm interpreters: sub-second starts, same pools, queues and UI."""

    type = WORKER_TYPE
    job_configuration = WarmJobConfiguration
    job_configuration_variables = WarmVariables
    _display_name = "Taskserver warm lane"
    _description = (
        "Executes flow runs in interpreters kept warm with Prefect, torch and the embedding model"
        " loaded, highest queue priority first. For small runs; heavy work belongs on Jobs."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        if kwargs.get("limit") is None:
            kwargs["limit"] = settings.warm_interpreters or DEFAULT_INTERPRETERS
        super().__init__(*args, **kwargs)
        size = int(self._limit or DEFAULT_INTERPRETERS)
        self._cores = os.cpu_count() or 1
        self._fixed_threads = settings.warm_threads
        self._pool = InterpreterPool(
            size, interpreter_env(threads=self._fixed_threads or self._cores), settings.warm_max_runs,
            settings.warm_max_rss_mb, self._logger,
        )
        # A run the base class is still submitting (Pending proposal, configuration) is on its
        # way to run(); one whose submission was aborted (another worker took it) is not.
        self._pool.still_coming = lambda run_id: run_id in self._submitting_flow_run_ids
        self._queue_priorities: dict[str, int] = {}
        self._in_flight: dict[UUID, FlowRun] = {}
        self._hostname = socket.gethostname()

    async def setup(self) -> None:
        await super().setup()
        group = anyio.create_task_group()
        await self._exit_stack.enter_async_context(group)
        # Unwound last in, first out: stop the heartbeats and spawns, then the interpreters.
        self._exit_stack.push_async_callback(self._pool.close)
        self._exit_stack.callback(group.cancel_scope.cancel)
        await self._pool.open(group)
        group.start_soon(self._heartbeat_loop)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        await self._refresh_queue_priorities()
        runs = await super().get_and_submit_flow_runs()
        # The base class has only scheduled the submissions; none has reached run() yet.
        for flow_run in runs:
            self._pool.announce(flow_run.id, self._priority_of(flow_run))
        return runs

    async def run(
        self,
        flow_run: FlowRun,
        configuration: WarmJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> WarmWorkerResult:
        try:
            async with self._pool.lease(self._priority_of(flow_run), flow_run.id) as interpreter:
                identifier = f"{self._hostname}:{interpreter.pid}"
                if task_status is not None:
                    task_status.started(identifier)
                # The first heartbeat comes from the interpreter once the run is Running (a heartbeat
                # before Running would be answered by the Running event itself and arm nothing);
                # this worker sends the ones after, every HEARTBEAT_SECONDS.
                self._in_flight[flow_run.id] = flow_run
                try:
                    outcome = await interpreter.execute(flow_run.id, dict(configuration.env),
                                                        self._threads_for_next_run())
                except InterpreterLost as lost:
                    self.get_flow_run_logger(flow_run).error(
                        f"Warm interpreter {interpreter.number} (pid {interpreter.pid}) exited with code"
                        f" {lost.returncode} while running this flow run"
                    )
                    return WarmWorkerResult(status_code=lost.returncode or -1, identifier=identifier)
                finally:
                    self._in_flight.pop(flow_run.id, None)
                self._logger.debug(
                    f"{flow_run.id} {outcome.state} in {outcome.seconds:.3f}s on interpreter"
                    f" {interpreter.number} ({outcome.rss_mb:.0f} MB)"
                )
            return WarmWorkerResult(status_code=0, identifier=identifier)
        finally:
            self.wake()  # the interpreter is free again and the slot frees as run() returns

    def _threads_for_next_run(self) -> int:
        """A run alone on this worker gets every core; runs that start beside others share them.

        A run keeps its count until it ends (torch cannot resize a running run's pool), so a run
        that starts while another is mid-way gets the share left, never less than one thread.
        """
        if self._fixed_threads:
            return self._fixed_threads
        return max(1, self._cores // max(1, len(self._in_flight)))

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: WarmJobConfiguration, grace_seconds: int = 30
    ) -> None:
        """Cancellation: the run's interpreter is stopped (SIGTERM, then SIGKILL) and replaced."""
        hostname, _, pid = infrastructure_pid.rpartition(":")
        interpreter = self._pool.find(int(pid)) if pid.isdigit() and hostname == self._hostname else None
        if interpreter is None:
            from prefect.exceptions import InfrastructureNotFound

            raise InfrastructureNotFound(f"No warm interpreter {infrastructure_pid} on this worker")
        interpreter.kill(signal.SIGTERM)
        with anyio.move_on_after(grace_seconds):
            await interpreter.process.wait()
            return
        interpreter.kill(signal.SIGKILL)

    # -- heartbeats on behalf of the runs this worker executes ---------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(HEARTBEAT_SECONDS)
            for flow_run in list(self._in_flight.values()):
                self._emit_heartbeat(flow_run)

    def _emit_heartbeat(self, flow_run: FlowRun) -> None:
        try:
            emit_run_heartbeat(flow_run)
        except Exception:  # a missed heartbeat is what the zombie automation tolerates
            self._logger.debug("Failed to emit a heartbeat", exc_info=True)

    @property
    def interpreter_pool(self) -> InterpreterPool:
        return self._pool
