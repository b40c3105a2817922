"""A diagnostic flow: records when its body started, sleeps, and records when it ended.

The priority tests and the queue benchmark deploy it into the real pools and queues and read
the records to see which run's body started first; it does no work of its own.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from taskserver.flows.heartbeats import heartbeat_hooks

PROBE_FLOW_NAME = "probe"


@flow(name=PROBE_FLOW_NAME, log_prints=True, **heartbeat_hooks())
def probe(
    label: Annotated[str, Field(description="Name of the record file this run writes.")],
    record_dir: Annotated[str, Field(description="Directory the start/end record is written to.")] = "",
    seconds: Annotated[float, Field(ge=0, le=600, description="How long the body sleeps.")] = 1.0,
    fault: Literal["", "raise", "segfault", "kill", "exit"] = "",
    allocate_mb: Annotated[int, Field(ge=0, le=4096)] = 0,
) -> dict:
    """Records its start, sleeps, records its end.

    Args:
        label: Name of the record file this run writes.
        record_dir: Directory the start/end record is written to.
        seconds: How long the body sleeps.
        fault: After recording its start, fail on purpose: raise an exception, segfault, SIGKILL
            its own process, or call os._exit(3). Used by the isolation tests.
        allocate_mb: Allocate and touch this many MB and keep them referenced until the process
            ends (a leak on purpose, for the warm lane's memory-bound test).
    """
    started = time.time()
    record = {
        "label": label,
        "flow_run_id": str(flow_run.get_id()),
        "started": started,
        "pid": os.getpid(),
    }
    if record_dir:  # one line per body start: a run executed twice shows two lines
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(record_dir) / f"{label}.starts.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if allocate_mb:
        block = bytearray(allocate_mb * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it counts as resident
        _LEAKED.append(block)
    if fault == "raise":
        raise RuntimeError(f"probe {label}: failing on purpose")
    if fault == "segfault":
        ctypes.string_at(0)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "exit":
        os._exit(3)
    time.sleep(seconds)
    record["ended"] = time.time()
    if record_dir:
        _write(Path(record_dir) / f"{label}.json", record)
    return record


_LEAKED: list[bytearray] = []


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
