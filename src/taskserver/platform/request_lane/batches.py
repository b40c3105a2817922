"""One call per batch of compatible requests, split back into one result (or error) per request.

Each task's call is its ``RequestHandler``'s ``batch`` (``catalogue``; taskserver's own in
``builtin``). A batch-wide failure that is not the whole batch's fault (one text crashing the
model) is retried request by request, so one request never fails the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from taskserver.errors import TaskserverError
from taskserver.platform.request_lane.catalogue import PreparedRequest, Result, request_tasks

Failure = dict[str, Any]


def error_record(exc: BaseException) -> Failure:
    """An exception as the row stores it: its class, the input, the reason, the hint, the message."""
    if isinstance(exc, TaskserverError):
        return {"type": type(exc).__name__, "input": exc.input, "reason": exc.reason, "hint": exc.hint,
                "message": str(exc)}
    return {"type": type(exc).__name__, "input": "request", "reason": f"{type(exc).__name__}: {exc}",
            "hint": "an unexpected error in the drainer; see its log", "message": f"request: {exc}"}


def use_threads(requested: int = 0) -> int:
    """Set the model's threads (``Settings.request_threads``; 0: OMP_NUM_THREADS, else this process's CPUs).

    Torch's own default counts the machine's cores, not the CPUs a container or an affinity mask
    allows, so on a shared node it oversubscribes; the count chosen here is returned for the log.
    """
    threads = requested or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    try:
        import torch
    except ImportError:  # a lane of tasks without torch: nothing to set
        return threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def warm_up() -> None:
    """Each request task's warm-up (the encoder's load), so the first request does not pay for it."""
    for handler in request_tasks().values():
        if handler.warm_up is not None:
            handler.warm_up()


def run_batch(requests: Sequence[PreparedRequest]) -> list[tuple[Result | None, Failure | None]]:
    """Each request's (result, None), or (None, its own error record)."""
    handler = requests[0].handler

    def function(batch: Sequence[PreparedRequest]) -> list[Result]:
        results = handler.batch([request.params for request in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"{batch[0].task}'s batch function returned {len(results)} results"
                               f" for {len(batch)} requests")
        return results

    try:
        return [(result, None) for result in function(requests)]
    except handler.whole_batch_errors as exc:
        return [(None, error_record(exc)) for _ in requests]
    except Exception as exc:  # noqa: BLE001 - isolate the request that caused it
        if len(requests) == 1:
            return [(None, error_record(exc))]
    outcomes: list[tuple[Result | None, Failure | None]] = []
    for request in requests:
        try:
            outcomes.append((function([request])[0], None))
        except Exception as exc:  # noqa: BLE001 - it is this request's own error now
            outcomes.append((None, error_record(exc)))
    return outcomes
