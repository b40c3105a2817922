"""A diagnostic flow: records when its body started, sleeps, and records when it ended.

The priority tests and the queue benchmark deploy it into the real pools and queues and read
the records to see which run's body started first; it does no work of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

PROBE_FLOW_NAME = "probe"


@flow(name=PROBE_FLOW_NAME, log_prints=True)
def probe(
    label: Annotated[str, Field(description="Name of the record file this run writes.")],
    record_dir: Annotated[str, Field(description="Directory the start/end record is written to.")] = "",
    seconds: Annotated[float, Field(ge=0, le=600, description="How long the body sleeps.")] = 1.0,
) -> dict:
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
    time.sleep(seconds)
    record["ended"] = time.time()
    if record_dir:
        _write(Path(record_dir) / f"{label}.json", record)
    return record


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
