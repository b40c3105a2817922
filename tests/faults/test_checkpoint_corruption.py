"""A corrupted newest checkpoint: the real ``train`` flow falls back to the previous one and says so in its logs.

Tiny data (3 steps per epoch, a checkpoint every 2 steps) on a real Prefect server; the warning is
read back from the flow run's logs over the API, where a person looking at the run would see it.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from text_factory import topic_rows, write_rows

pytestmark = [pytest.mark.torch_threads(1), pytest.mark.faults, pytest.mark.usefixtures("prefect_harness")]

os.environ.setdefault("OMP_NUM_THREADS", "1")




def _parameters(data: Path, out: Path) -> dict:
    # 24 rows, 18 for training / 8 per step = 3 steps per epoch; 2 epochs = 6 steps; checkpoints at 2, 4, 6.
    return dict(data_path=str(data), output_dir=str(out), epochs=2, batch_size=8, max_length=16,
                checkpoint_every=2, keep_checkpoints=2, validation_fraction=0.25, seed=0)


def _run_logs(flow_run_id, must_contain: str, timeout: float = 30) -> list[str]:
    """The run's log messages (its tasks' included), once the one we look for has arrived."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    async def read() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return [log.message for log in logs]

    APILogWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        messages = asyncio.run(read())
        if any(must_contain in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for i in range(0, len(data), 97):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning_in_the_run_logs(tmp_path):
    from taskserver.flows.train import train
    from taskserver.training import list_checkpoints

    data = write_rows(tmp_path / "topics.jsonl", topic_rows(8, seed=1))
    out = tmp_path / "job"
    first = train(**_parameters(data, out), return_state=True)
    assert first.is_completed(), first.message
    assert first.result()["steps"] == 6
    checkpoints = list_checkpoints(str(out))
    assert [p.name for p in checkpoints] == ["step-000004", "step-000006"]

    newest = checkpoints[-1]
    weights = sorted(newest.glob("*.safetensors"))
    assert weights, sorted(p.name for p in newest.iterdir())
    for file in weights:  # truncated, as a write cut short by a crash leaves it
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    for file in sorted(newest.glob("*.bin")):  # and garbled
        _garble(file)

    again = train(**_parameters(data, out), return_state=True)

    assert again.is_completed(), again.message
    summary = again.result()
    assert summary["resumed_from_step"] == 4  # the previous checkpoint, not a fresh start
    assert summary["steps"] == 6
    messages = _run_logs(again.state_details.flow_run_id, "is corrupt or incomplete")
    warning = [m for m in messages if "is corrupt or incomplete" in m]
    assert warning, messages
    assert str(newest) in warning[0] and "falling back to the previous one" in warning[0]
    assert "model.safetensors is unreadable" in warning[0] or ".safetensors is unreadable" in warning[0]
    assert any("Resuming from the checkpoint at step 4" in m for m in messages), messages
    # The corrupt checkpoint was replaced by a good one at the same step; the model was saved.
    assert [p.name for p in list_checkpoints(str(out))] == ["step-000004", "step-000006"]
    assert Path(summary["model_dir"], "taskserver-model.json").is_file()


def test_every_checkpoint_corrupt_starts_over_and_says_so(tmp_path):
    from taskserver.flows.train import train
    from taskserver.training import STATE_FILE, list_checkpoints

    data = write_rows(tmp_path / "topics.jsonl", topic_rows(8, seed=2))
    out = tmp_path / "job"
    first = train(**{**_parameters(data, out), "epochs": 1}, return_state=True)
    assert first.is_completed(), first.message
    for checkpoint in list_checkpoints(str(out)):
        (checkpoint / STATE_FILE).write_text("{not json")

    again = train(**{**_parameters(data, out), "epochs": 1}, return_state=True)

    assert again.is_completed(), again.message
    assert again.result()["resumed_from_step"] is None
    messages = _run_logs(again.state_details.flow_run_id, "is corrupt or incomplete")
    warnings = [m for m in messages if "is corrupt or incomplete" in m]
    assert len(warnings) == 2, messages
    assert "step-000003" in warnings[0] and "falling back to the previous one" in warnings[0]
    assert "step-000002" in warnings[1] and "no older checkpoint, so training starts from step 0" in warnings[1]
