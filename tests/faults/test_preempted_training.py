"""SIGTERM to a training run halfway, as Kubernetes preemption or eviction sends it: the run is
rescheduled by the recovery service, resumes from its newest checkpoint and ends as good as an
uninterrupted run with the same seed."""

from __future__ import annotations

import json
import random
import re
import signal
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from text_factory import topic_rows, write_rows

from fault_support import RecoveryService, all_in, create_runs, flow_run_process, read_runs, state_types, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

TERMINATION_MESSAGE = "Execution was aborted by a termination signal."
CHECKPOINT_EVERY = 3
TOTAL_STEPS = 18
"""90 training rows / 16 per step = 6 steps per epoch, 3 epochs; checkpoints every 3 steps."""
ACCURACY_TOLERANCE = 0.05
"""The resumed run replays the same batches (the sampler depends only on seed and epoch) from a
checkpoint holding weights, optimizer, scheduler and RNG states, so it should match the reference
up to float non-determinism; 0.05 is about one of the 30 validation rows flipping."""
LOSS_TOLERANCE = 0.1
"""Relative: the validation loss is small (about 0.01 here), so an absolute bound would say nothing."""


def _config(data: Path, out: Path) -> dict:
    return dict(data_path=str(data), output_dir=str(out), epochs=3, batch_size=16, max_length=32,
                checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=2, validation_fraction=0.25,
                learning_rate=1e-4, seed=0)


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir()
                  if p.name.startswith("step-") and (p / "taskserver-state.json").is_file())


def test_sigterm_halfway_resumes_from_the_checkpoint_and_matches_an_uninterrupted_run(
        prefect_server, start_worker, tmp_path):
    import torch

    from taskserver.training import TrainConfig, train_classifier

    rows = topic_rows(40, seed=0)
    random.Random(0).shuffle(rows)
    data = write_rows(tmp_path / "topics.jsonl", rows)

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        out = tmp_path / "preempted"
        [run_id] = create_runs("train/normal", [_config(data, out)])
        worker = start_worker("gpu", slots=1)
        wait_for(lambda: any(step >= TOTAL_STEPS // 2 for step in _checkpoint_steps(out)), timeout=300,
                 what="a checkpoint halfway through", interval=0.2)
        engine = flow_run_process(run_id, worker)
        engine.send_signal(signal.SIGTERM)  # the flow-run process only, as the kubelet would
        wait_for(lambda: all_in([run_id], {"CRASHED", "COMPLETED", "FAILED"}), timeout=120,
                 what="the terminated run to be reported", interval=0.5)
        interrupted_at = max(_checkpoint_steps(out))
        assert state_types([run_id]) == {run_id: "CRASHED"}
        assert TOTAL_STEPS // 2 <= interrupted_at < TOTAL_STEPS, f"not halfway: stopped at {interrupted_at}"

        recovery = RecoveryService(prefect_server.api_url, tmp_path / "recovery.log", extra_args=["--pool", "gpu"])
        recovery.start()
        try:
            wait_for(lambda: all_in([run_id], {"COMPLETED", "FAILED", "CANCELLED"}), timeout=400,
                     what="the rescheduled run to finish")
        finally:
            recovery.stop()
        run = read_runs([run_id])[run_id]
        assert run.state_type == "COMPLETED", f"{run.state_name}: {run.message}"
        assert run.messages("CRASHED") == [TERMINATION_MESSAGE], run.history
        assert run.count("COMPLETED") == 1 and run.run_count == 2, run.history
        assert "attempt 2 of 3" in recovery.output()

    # The resumed attempt started from the checkpoint SIGTERM left, not from step 0: it lost at
    # most the steps since the last scheduled checkpoint, and reached the same final step.
    model_meta = json.loads((out / "model" / "taskserver-model.json").read_text())
    worker_log = Path(worker.log).read_text(errors="replace")
    assert f"Resuming from the checkpoint at step {interrupted_at}" in worker_log
    assert worker_log.count("Resuming from the checkpoint") == 1
    scheduled = [int(n) for n in re.findall(r"Checkpoint saved at step (\d+)", worker_log)]
    before_sigterm = [n for n in scheduled if n <= interrupted_at]
    assert interrupted_at - max(n for n in before_sigterm if n % CHECKPOINT_EVERY == 0) < CHECKPOINT_EVERY
    assert model_meta["trained_steps"] == TOTAL_STEPS

    torch.set_num_threads(1)
    reference = train_classifier(TrainConfig(**_config(data, tmp_path / "reference")))
    assert reference.steps == TOTAL_STEPS and reference.resumed_from_step is None
    resumed, expected = model_meta["metrics"], reference.final
    assert abs(resumed["val_accuracy"] - expected.val_accuracy) <= ACCURACY_TOLERANCE, (resumed, expected)
    assert abs(resumed["val_loss"] - expected.val_loss) <= LOSS_TOLERANCE * expected.val_loss, (resumed, expected)
    print(f"interrupted at step {interrupted_at}; val loss resumed {resumed['val_loss']:.6f} vs uninterrupted"
          f" {expected.val_loss:.6f}; accuracy {resumed['val_accuracy']:.4f} vs {expected.val_accuracy:.4f}")
