"""The ``train`` flow: fine-tune a text classifier, in-process or under ``accelerate launch``.

A thin wrapper over ``taskserver.training``. Training resumes from the newest checkpoint in
``output_dir``, so a retried or rescheduled run continues where the last one stopped.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from taskserver import training
from taskserver.flows.runtime import (
    Progress,
    library_logs_in_run,
    markdown_table,
    publish_summary,
    publish_table,
    retry_transient_only,
)
from taskserver.training import TrainConfig, TrainProgress, TrainResult

PROGRESS_EVERY_SECONDS = 5.0
"""Progress artifact updates are API calls: at most one per this many seconds, plus one per epoch."""


class _Reporter:
    """Turns training events into a progress artifact and log lines, throttled so they cost no speed."""

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.progress: Progress | None = None
        self.last_update = 0.0

    def __call__(self, event: TrainProgress) -> None:
        if event.kind == "start":
            self.progress = Progress(event.total_steps, f"training ({event.total_steps} steps)")
            if event.resumed_from_step:
                self.logger.info("Resuming from the checkpoint at step %d", event.resumed_from_step)
                self.progress.advance(event.resumed_from_step, "resumed from checkpoint")
            self.last_update = time.monotonic()
            return
        if event.kind == "epoch" and event.metrics is not None:
            m = event.metrics
            self.logger.info(
                "Epoch %d (step %d): train loss %.4f, val loss %.4f, val accuracy %.4f, macro-F1 %.4f",
                m.epoch, m.step, m.train_loss, m.val_loss, m.val_accuracy, m.val_macro_f1,
            )
        elif event.kind == "checkpoint":
            self.logger.info("Checkpoint saved at step %d: %s", event.step, event.checkpoint)
        now = time.monotonic()
        if self.progress is not None and (event.kind == "epoch" or now - self.last_update >= PROGRESS_EVERY_SECONDS):
            note = f"loss {event.loss:.4f}" if event.loss is not None else event.kind
            self.progress.advance(event.step - self.progress.done, note)
            self.last_update = now


@task(
    name="fit-classifier",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def fit_classifier(config: TrainConfig, num_processes: int) -> TrainResult:
    """One training attempt; a retry resumes from the checkpoints the failed attempt left."""
    logger = get_run_logger()

    def forward_log(line: str) -> None:
        if line.strip():
            logger.info("%s", line)

    with library_logs_in_run():  # e.g. "checkpoint ... is corrupt; falling back to the previous one"
        return training.run_job(config, num_processes, on_progress=_Reporter(), on_log=forward_log)


@flow(name="train", description="Fine-tune a text classifier (all-MiniLM-L6-v2 + linear head) with accelerate.")
def train(
    data_path: str,
    output_dir: str,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1,
    validation_path: str | None = None,
    epochs: Annotated[int, Field(ge=1)] = 3,
    batch_size: Annotated[int, Field(ge=1)] = 16,
    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-4,
    max_length: Annotated[int, Field(ge=8, le=512)] = 128,
    checkpoint_every: Annotated[int, Field(ge=1)] = 50,
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2,
    seed: int = 0,
    max_steps: Annotated[int | None, Field(ge=1)] = None,
    base_model: str | None = None,
    num_processes: Annotated[int, Field(ge=1, le=64)] = 1,
) -> dict[str, Any]:
    """Train, publish the training curve and a summary, and return the model directory and final metrics.

    Args:
        data_path: JSONL or CSV with a text and a label per row; relative to the data dir.
        output_dir: Checkpoints and the final model (<output_dir>/model). Re-using it resumes the job.
        text_column: Column (CSV) or field (JSONL) with the text.
        label_column: Column (CSV) or field (JSONL) with the label.
        validation_fraction: Share of rows held out for validation (seeded, stratified).
        validation_path: A separate validation file; overrides validation_fraction.
        epochs: Passes over the training rows.
        batch_size: Rows per step on each process.
        learning_rate: Peak learning rate (warmup, then linear decay).
        max_length: Tokens kept per text.
        checkpoint_every: Steps between resumable checkpoints.
        keep_checkpoints: How many of the newest checkpoints to keep.
        seed: Seed for the split, shuffling and initialisation.
        max_steps: Stop after this many steps in all.
        base_model: Encoder to start from; default: the bundled all-MiniLM-L6-v2.
        num_processes: 1 trains in this process; more runs `accelerate launch` (one per GPU).
    """
    config = TrainConfig(
        data_path=data_path, output_dir=output_dir, text_column=text_column, label_column=label_column,
        validation_fraction=validation_fraction, validation_path=validation_path, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed,
        max_steps=max_steps, base_model=base_model,
    )
    result = fit_classifier(config, num_processes)
    final = result.final
    summary: dict[str, Any] = {
        "model_dir": result.model_dir,
        "steps": result.steps,
        "epochs_completed": result.epochs_completed,
        "resumed_from_step": result.resumed_from_step,
        "labels": result.labels,
        "train_rows": result.train_rows,
        "validation_rows": result.validation_rows,
        "num_processes": result.num_processes,
        "val_accuracy": final.val_accuracy if final else None,
        "val_macro_f1": final.val_macro_f1 if final else None,
        "seconds": round(result.seconds, 3),
    }
    _publish(result, summary)
    return summary


def _publish(result: TrainResult, summary: dict[str, Any]) -> None:
    curve = [
        {"epoch": m.epoch, "step": m.step, "train_loss": round(m.train_loss, 5), "val_loss": round(m.val_loss, 5),
         "val_accuracy": round(m.val_accuracy, 4), "val_macro_f1": round(m.val_macro_f1, 4),
         "seconds": round(m.seconds, 2)}
        for m in result.history
    ]
    publish_table("train-curve", curve, "Training curve: loss, validation accuracy and macro-F1 per epoch")
    rows = [
        ("model", f"`{summary['model_dir']}`"),
        ("labels", ", ".join(result.labels)),
        ("training / validation rows", f"{result.train_rows} / {result.validation_rows}"),
        ("steps", summary["steps"]),
        ("resumed from step", summary["resumed_from_step"] if summary["resumed_from_step"] is not None else "-"),
        ("processes", summary["num_processes"]),
        ("val accuracy", f"{summary['val_accuracy']:.4f}" if summary["val_accuracy"] is not None else "-"),
        ("val macro-F1", f"{summary['val_macro_f1']:.4f}" if summary["val_macro_f1"] is not None else "-"),
        ("seconds", f"{result.seconds:.1f} ({result.steps / max(result.seconds, 1e-9):.2f} steps/s)"),
    ]
    publish_summary("train-summary", "Training", markdown_table(["", "value"], rows))
