"""The Celery 5 + Redis peer for ``bench_queue.py``: one task that records its body start like
taskserver's ``probe`` flow, and an app set up for Celery's strictest priority behaviour.

Priority is one Redis list per level, consumed with ``queue_order_strategy='priority'`` (the
worker runs ``-Q critical,high,normal,low``): BRPOP always takes from the first non-empty list.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from celery import Celery
from kombu import Queue

REDIS_URL_ENV = "BENCH_REDIS_URL"
QUEUES: tuple[str, ...] = ("critical", "high", "normal", "low")
"""Served in this order; names match taskserver's priority levels."""

app = Celery("celery_peer", broker=os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,  # a worker reserves nothing beyond what it runs (acks_late)
    broker_transport_options={"queue_order_strategy": "priority"},  # default is round-robin
    task_default_queue="normal",
    task_queues=[Queue(name) for name in QUEUES],  # so purge() empties every level
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)


@app.task(name="probe")
def probe(label: str, record_dir: str, seconds: float = 1.0) -> None:
    """Same records as ``taskserver.flows.probe``: ``<label>.starts.jsonl`` then ``<label>.json``."""
    started = time.time()
    record = {"label": label, "started": started, "pid": os.getpid()}
    directory = Path(record_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{label}.starts.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    time.sleep(seconds)
    record["ended"] = time.time()
    tmp = directory / f"{label}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, directory / f"{label}.json")


_model = None


@app.task(name="encode_one")
def encode_one(request_id: str, text: str, out_dir: str) -> None:
    """One text to one vector with the same model and library call as taskserver's encode flow;
    the model is loaded once per worker process (on its first task)."""
    global _model
    import numpy as np

    from taskserver import encoding

    if _model is None:
        _model = encoding.get_encoder()
    embeddings = encoding.encode_texts([text], [request_id], cache=None)
    tmp = Path(out_dir) / f"{request_id}.{os.getpid()}.tmp.npy"
    np.save(tmp, embeddings.vectors)
    os.replace(tmp, Path(out_dir) / f"{request_id}.npy")
