"""The ``train`` flow: fine-tune a text classifier, in-process or under ``accelerate launch``.

A thin wrapper over ``taskserver.training`` (resumes from the newest checkpoint in ``output_dir``,
so a retried or rescheduled run continues), ``taskserver.registry`` (the new model replaces the
champion at ``model_dir`` only if it beats it) and ``taskserver.tracking`` (MLflow, when set up).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from pydantic import Field

from taskserver import registry, storage, tracking, training
from taskserver.flows.forms import OptionalCount, OptionalText, given
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver.flows.runtime import (
    Progress,
    chart_markdown,
    library_logs_in_run,
    new_figure,
    markdown_table,
    publish_summary,
    publish_table,
    retry_transient_only,
    with_failure_note,
)
from taskserver.registry import Decision
from taskserver.samples import SAMPLE_TRAINING_SET
from taskserver.training import TrainConfig, TrainProgress, TrainResult

PROGRESS_EVERY_SECONDS = 5.0
"""Progress artifact updates are API calls: at most one per this many seconds, plus one per epoch."""
DEFAULT_MODELS_DIR = "outputs/models"
DEFAULT_PROMOTION_MARGIN = 0.01
"""One macro-F1 point: on a few hundred validation rows a smaller gain is within noise (one row
flips F1 by about 1/n), so the champion stays unless the challenger is clearly better."""


class _Reporter:
    """Turns training events into a progress artifact and log lines, throttled so they cost no speed."""

    def __init__(self, tracker: tracking.Tracker | None = None) -> None:
        self.logger = get_run_logger()
        self.tracker = tracker or tracking.Tracker()
        self.progress: Progress | None = None
        self.last_update = 0.0

    def __call__(self, event: TrainProgress) -> None:
        if event.kind == "start":
            self.progress = Progress(event.total_steps, "training steps")
            if event.resumed_from_step:
                self.logger.info("Resuming from the checkpoint at step %d", event.resumed_from_step)
                self.progress.skip(event.resumed_from_step, "resumed from checkpoint")
            self.last_update = time.monotonic()
            return
        if event.kind == "epoch" and event.metrics is not None:
            m = event.metrics
            self.logger.info(
                "Epoch %d (step %d): train loss %.4f, val loss %.4f, val accuracy %.4f, macro-F1 %.4f",
                m.epoch, m.step, m.train_loss, m.val_loss, m.val_accuracy, m.val_macro_f1,
            )
            self.tracker.log_epoch(m)
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
def fit_classifier(config: TrainConfig, num_processes: int, tracker: tracking.Tracker | None = None) -> TrainResult:
    """One training attempt; a retry resumes from the checkpoints the failed attempt left."""
    logger = get_run_logger()

    def forward_log(line: str) -> None:
        if line.strip():
            logger.info("%s", line)

    with library_logs_in_run():  # e.g. "checkpoint ... is corrupt; falling back to the previous one"
        return training.run_job(config, num_processes, on_progress=_Reporter(tracker), on_log=forward_log)


@task(name="promote-challenger", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient_only,
      cache_policy=NO_CACHE, persist_result=False)
def promote_challenger(config: TrainConfig, result: TrainResult, model_dir: str, margin: float,
                       lineage: dict[str, Any]) -> Decision:
    """Compare the new model with the champion on this run's validation rows; promote it if it wins."""
    with library_logs_in_run():
        validation = training.load_dataset(config).validation  # the same seeded split training used
        return registry.promote(result.model_dir, model_dir, validation, margin=margin, lineage=lineage,
                                validation_source=config.validation_path or f"{config.data_path} (validation split)")


@flow(name="train", description="Fine-tune a text classifier (all-MiniLM-L6-v2 + linear head) with accelerate.",
      **with_failure_note(heartbeat_hooks()))
def train(
    data_path: str = SAMPLE_TRAINING_SET,
    output_dir: OptionalText = "",
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1,
    validation_path: OptionalText = "",
    epochs: Annotated[int, Field(ge=1)] = 3,
    batch_size: Annotated[int, Field(ge=1)] = 16,
    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-4,
    max_length: Annotated[int, Field(ge=8, le=512)] = 128,
    checkpoint_every: Annotated[int, Field(ge=1)] = 50,
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2,
    seed: int = 0,
    max_steps: OptionalCount = 0,
    base_model: OptionalText = "",
    num_processes: Annotated[int, Field(ge=1, le=64)] = 1,
    early_stopping_patience: OptionalCount = 2,
    group_by_length: bool = True,
    model_dir: OptionalText = "",
    promotion_margin: Annotated[float, Field(ge=0.0, le=1.0)] = DEFAULT_PROMOTION_MARGIN,
) -> dict[str, Any]:
    """Train, publish the training curve and a summary, promote the model if it beats the champion,
    and return the location to pass to infer, the metrics and the promotion decision.

    Args:
        data_path: JSONL or CSV with a text and a label per row; relative to the data dir. The
            default, samples:tickets.jsonl, is 144 support tickets shipped with taskserver.
        output_dir: Checkpoints and this run's model (its model folder). Re-using it resumes the
            job. Empty: outputs/models/RUN-ID, or MODEL_DIR/runs/RUN-ID when model_dir is given.
        text_column: Column (CSV) or field (JSONL) with the text.
        label_column: Column (CSV) or field (JSONL) with the label.
        validation_fraction: Share of rows held out for validation (seeded, stratified): more
            than 0 and less than 1, e.g. 0.1.
        validation_path: A separate validation file; overrides validation_fraction. Empty: split
            data_path.
        epochs: Passes over the training rows, at least 1 (at most this many: see early_stopping_patience).
        batch_size: Rows per step on each process, at least 1.
        learning_rate: Peak learning rate (warmup, then linear decay), more than 0, e.g. 0.0001.
        max_length: Tokens kept per text, 8 to 512.
        checkpoint_every: Steps between resumable checkpoints, at least 1.
        keep_checkpoints: How many of the newest checkpoints to keep, at least 1.
        seed: Seed for the split, shuffling and initialisation.
        max_steps: Stop after this many steps in all. 0: no limit.
        base_model: Encoder to start from. Empty: the bundled all-MiniLM-L6-v2.
        num_processes: 1 trains in this process; more (up to 64) runs accelerate launch, one per GPU.
        early_stopping_patience: Stop after this many epochs without a better validation macro-F1
            (the best epoch's model is kept either way). 0: train every epoch.
        group_by_length: Batch texts of similar length together: less padding, faster on CPU.
        model_dir: The served location infer reads (the champion). The new model becomes the
            champion only if it beats the current one on this run's validation rows by
            promotion_margin. Empty: no promotion.
        promotion_margin: Macro-F1 points, 0 to 1, by which the new model must beat the champion
            to replace it.
    """
    run_id = str(flow_run.id) if flow_run.id else None
    output_dir = output_dir or default_output_dir(model_dir, run_id)
    config = TrainConfig(
        data_path=data_path, output_dir=output_dir, text_column=text_column, label_column=label_column,
        validation_fraction=validation_fraction, validation_path=given(validation_path), epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed,
        max_steps=given(max_steps), base_model=given(base_model),
        early_stopping_patience=given(early_stopping_patience),
        group_by_length=group_by_length,
    )
    if model_dir:  # a challenger on other labels than the champion's fails before any training
        registry.check_challenger_labels(model_dir, training.load_dataset(config).labels, config.data_path)
    model_dir = given(model_dir)
    parameters = {**config.model_dump(), "num_processes": num_processes, "model_dir": model_dir,
                  "promotion_margin": promotion_margin}
    tracker = tracking.start_run(f"train {flow_run.name or ''}".strip(), parameters, run_id)
    try:
        result = fit_classifier(config, num_processes, quote(tracker))
        decision = None
        if model_dir:
            lineage = _lineage(result, parameters, run_id, tracker)
            decision = promote_challenger(config, result, model_dir, promotion_margin, lineage)
    except BaseException:
        tracker.end(failed=True)
        raise
    best = result.best
    tracker.log_result(
        {f"best_{k}": v for k, v in asdict(best).items() if k.startswith("val_")} if best else {},
        {"promoted": str(decision.promoted) if decision else "no model_dir",
         "champion": str(decision.champion) if decision else ""},
        result.model_dir,
    )
    tracker.end()
    summary = _summary(result, model_dir, decision, tracker)
    _publish(result, summary, decision)
    return summary


def default_output_dir(model_dir: str, run_id: str | None) -> str:
    """Where a run without an output_dir trains: under the champion's location, else under outputs/models."""
    if model_dir:
        return storage.join(model_dir, "runs", run_id or "local")
    return storage.join(DEFAULT_MODELS_DIR, run_id or "local")


def _lineage(result: TrainResult, parameters: dict[str, Any], run_id: str | None,
             tracker: tracking.Tracker) -> dict[str, Any]:
    """What a promoted model records about where it came from."""
    return {
        "run_id": run_id,
        "flow_run_name": flow_run.name,
        "data_sha256": result.data_sha256,
        "parameters": parameters,
        "metrics": asdict(result.best) if result.best else None,
        "history": [asdict(m) for m in result.history],
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "challenger_dir": result.model_dir,
        "mlflow_run_id": tracker.run_id,
        "trained_at": time.time(),
    }


def _summary(result: TrainResult, model_dir: str | None, decision: Decision | None,
             tracker: tracking.Tracker) -> dict[str, Any]:
    best = result.best
    return {
        "model_dir": model_dir or result.model_dir,
        "challenger_dir": result.model_dir,
        "steps": result.steps,
        "epochs_completed": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "labels": result.labels,
        "train_rows": result.train_rows,
        "validation_rows": result.validation_rows,
        "num_processes": result.num_processes,
        "val_accuracy": best.val_accuracy if best else None,
        "val_macro_f1": best.val_macro_f1 if best else None,
        "seconds": round(result.seconds, 3),
        "promotion": decision.to_dict() if decision else None,
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_url": tracker.url,
    }


def _publish(result: TrainResult, summary: dict[str, Any], decision: Decision | None) -> None:
    curve = [
        {"epoch": m.epoch, "step": m.step, "train_loss": round(m.train_loss, 5), "val_loss": round(m.val_loss, 5),
         "val_accuracy": round(m.val_accuracy, 4), "val_macro_f1": round(m.val_macro_f1, 4),
         "seconds": round(m.seconds, 2), "kept": m.epoch == result.best_epoch}
        for m in result.history
    ]
    publish_table("train-curve", curve, "Training curve: loss, validation accuracy and macro-F1 per epoch")
    rows = [
        ("model", f"`{storage.relative(summary['challenger_dir'])}`"),
        ("labels", ", ".join(result.labels)),
        ("training / validation rows", f"{result.train_rows} / {result.validation_rows}"),
        ("steps", summary["steps"]),
        ("kept epoch", f"{summary['best_epoch']} (best validation macro-F1"
                       f"{'; stopped early' if result.stopped_early else ''})"),
        ("resumed from step", summary["resumed_from_step"] if summary["resumed_from_step"] is not None else "-"),
        ("processes", summary["num_processes"]),
        ("val accuracy", f"{summary['val_accuracy']:.4f}" if summary["val_accuracy"] is not None else "-"),
        ("val macro-F1", f"{summary['val_macro_f1']:.4f}" if summary["val_macro_f1"] is not None else "-"),
        ("seconds", f"{result.seconds:.1f} ({result.steps / max(result.seconds, 1e-9):.2f} steps/s)"),
        ("MLflow run", f"[{summary['mlflow_run_id']}]({summary['mlflow_run_url']})" if summary["mlflow_run_id"]
         else "- (not tracked)"),
    ]
    if decision is not None:
        rows += [("served location", f"`{storage.relative(summary['model_dir'])}`"),
                 ("promoted", f"{'yes' if decision.promoted else 'no'}: {decision.reason}"),
                 ("champion", f"{decision.champion}" + (f" (previous: {decision.previous})" if decision.previous
                                                        else ""))]
    markdown = markdown_table(["", "value"], rows)
    if result.history:
        markdown = "## Training curve\n\n" + _curve_chart(result) + "\n\n" + markdown
    publish_summary("train-summary", "Training", markdown)


def _curve_chart(result: TrainResult) -> str:
    """Loss (left) and validation accuracy and macro-F1 (right) per epoch; the kept epoch marked."""
    epochs = [m.epoch for m in result.history]
    figure, (losses, scores) = new_figure(9.0, 3.2, columns=2)
    losses.plot(epochs, [m.train_loss for m in result.history], marker="o", label="training loss")
    losses.plot(epochs, [m.val_loss for m in result.history], marker="o", label="validation loss")
    scores.plot(epochs, [m.val_accuracy for m in result.history], marker="o", label="validation accuracy")
    scores.plot(epochs, [m.val_macro_f1 for m in result.history], marker="o", label="validation macro-F1")
    scores.set_ylim(0, 1.02)
    for axes, title in ((losses, "Loss"), (scores, "Validation scores")):
        if result.best_epoch is not None:
            axes.axvline(result.best_epoch, color="grey", linestyle=":", label=f"kept epoch ({result.best_epoch})")
        axes.set_xlabel("epoch")
        axes.set_xticks(epochs)
        axes.set_title(title)
        axes.legend(fontsize="small")
    return chart_markdown(figure, "Training curve")
