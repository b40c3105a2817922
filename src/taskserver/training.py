"""Fine-tune a text classifier (MiniLM encoder + mean pooling + linear head) with accelerate.

Runs in one process or under ``accelerate launch``. Checkpoints every N steps and resumes
automatically from the newest readable checkpoint in ``output_dir``, so a crashed, evicted or
retried job continues instead of starting over.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from taskserver import errors, storage
from taskserver.errors import ParameterError, TaskserverError, TrainingDataError, TransientError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "taskserver-state.json"
MODEL_SUBDIR = "model"
BEST_DIR = "best"
"""``<output_dir>/best/step-N``: the model of the best epoch so far, while later epochs train."""
GROUP_BATCHES = 50
"""Length grouping sorts rows within windows of this many batches: little padding, still shuffled."""
PROGRESS_PREFIX = "TASKSERVER_PROGRESS "


class TrainConfig(BaseModel):
    """One training job. Re-running with the same ``output_dir`` resumes it."""

    data_path: str = Field(description="JSONL or CSV file with one text and one label per row.")
    output_dir: str = Field(description="Where checkpoints and the final model go (a local or mounted path).")
    text_column: str = Field(default="text", description="Column (CSV) or field (JSONL) holding the text.")
    label_column: str = Field(default="label", description="Column (CSV) or field (JSONL) holding the label.")
    validation_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Share of rows held out for validation (seeded, stratified)."
    )
    validation_path: str | None = Field(
        default=None, description="A separate validation file; when set, validation_fraction is ignored."
    )
    epochs: int = Field(default=3, ge=1, description="Passes over the training rows.")
    batch_size: int = Field(default=16, ge=1, description="Rows per step on each process.")
    learning_rate: float = Field(default=1e-4, gt=0.0, description="Peak learning rate (linear warmup, then decay).")
    warmup_fraction: float = Field(default=0.06, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW weight decay.")
    max_length: int = Field(default=128, ge=8, le=512, description="Tokens kept per text.")
    checkpoint_every: int = Field(default=50, ge=1, description="Save a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(default=2, ge=1, description="How many of the newest checkpoints to keep.")
    seed: int = Field(default=0, description="Seed for the split, shuffling and initialisation.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many steps in all.")
    early_stopping_patience: int | None = Field(
        default=2, ge=1,
        description="Stop after this many epochs without a better validation macro-F1; None trains every epoch.",
    )
    group_by_length: bool = Field(
        default=True, description="Batch rows of similar token length together (less padding, same seeded order)."
    )
    base_model: str | None = Field(
        default=None, description="Encoder to start from; default: the bundled all-MiniLM-L6-v2."
    )

    @model_validator(mode="after")
    def _paths_given(self) -> "TrainConfig":
        if not self.data_path.strip():
            raise ValueError("data_path is empty")
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty")
        return self


@dataclass
class EpochMetrics:
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float


@dataclass
class TrainResult:
    model_dir: str
    steps: int
    epochs_completed: int
    history: list[EpochMetrics]
    resumed_from_step: int | None
    seconds: float
    labels: list[str] = field(default_factory=list)
    train_rows: int = 0
    validation_rows: int = 0
    num_processes: int = 1
    best_epoch: int | None = None
    stopped_early: bool = False
    data_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> EpochMetrics | None:
        """The last epoch trained."""
        return self.history[-1] if self.history else None

    @property
    def best(self) -> EpochMetrics | None:
        """The epoch whose model was kept (best validation macro-F1)."""
        return next((m for m in self.history if m.epoch == self.best_epoch), self.final)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainResult":
        data = dict(data)
        data["history"] = [EpochMetrics(**m) for m in data.get("history", [])]
        return cls(**data)


@dataclass
class TrainProgress:
    """What ``on_progress`` receives (main process only)."""

    kind: Literal["start", "step", "epoch", "checkpoint"]
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    metrics: EpochMetrics | None = None
    checkpoint: str | None = None
    resumed_from_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainProgress":
        data = dict(data)
        if data.get("metrics"):
            data["metrics"] = EpochMetrics(**data["metrics"])
        return cls(**data)


class TrainingInterrupted(TransientError):
    """SIGTERM arrived; a checkpoint was saved, so running the same job again resumes it."""


# --------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def _read_rows(path: str, columns: tuple[str, str]) -> tuple[list[Example], str]:
    """Rows of a JSONL or CSV file and the file's sha256; every data problem named by file, row and column."""
    text_column, label_column = columns
    try:
        raw = storage.read_bytes(path)
    except errors.InvalidInputError:
        raise TrainingDataError(path, "file not found") from None
    except OSError as exc:
        raise TrainingDataError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainingDataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not content.strip():
        raise TrainingDataError(path, "the file is empty")

    lower = path.lower()
    is_csv = lower.endswith((".csv", ".tsv")) or (
        not lower.endswith((".jsonl", ".ndjson", ".json")) and not content.lstrip().startswith("{")
    )
    records: list[tuple[int, dict[str, Any]]] = []
    if is_csv:
        reader = csv.DictReader(io.StringIO(content), delimiter="\t" if lower.endswith(".tsv") else ",")
        header = reader.fieldnames or []
        for column, role in ((text_column, "text"), (label_column, "label")):
            if column not in header:
                raise TrainingDataError(
                    path, f"unknown {role} column {column!r}; the header has: {', '.join(header) or 'nothing'}"
                )
        records = [(number, row) for number, row in enumerate(reader, start=2)]  # line 1 is the header
    else:
        for number, obj in storage.json_lines(content, path, TrainingDataError):
            if not isinstance(obj, dict):
                raise TrainingDataError(f"{path} line {number}", "expected a JSON object per line")
            records.append((number, obj))
        if records:
            first_line, first = records[0]
            for column, role in ((text_column, "text"), (label_column, "label")):
                if column not in first:
                    raise TrainingDataError(
                        f"{path} line {first_line}",
                        f"unknown {role} column {column!r}; the row has: {', '.join(map(str, first)) or 'nothing'}",
                    )
    if not records:
        raise TrainingDataError(path, "no data rows")

    examples: list[Example] = []
    for number, record in records:
        where = f"{path} line {number}"
        text = record.get(text_column)
        label = record.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise TrainingDataError(where, f"missing label in column {label_column!r}")
        if isinstance(label, (dict, list)):
            raise TrainingDataError(where, f"label in column {label_column!r} is not a scalar: {label!r}")
        if not isinstance(text, str) or not text.strip():
            raise TrainingDataError(where, f"missing or non-string text in column {text_column!r}")
        examples.append(Example(text, str(label).strip()))
    return examples, hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    validation: list[Example]
    labels: list[str]
    sha256: dict[str, str] = field(default_factory=dict)
    """Each file read (data, and validation when separate) -> sha256 of its bytes: the data's lineage."""


def load_dataset(config: TrainConfig) -> Dataset:
    """Read and split the data; raise TrainingDataError for anything that cannot train a classifier."""
    columns = (config.text_column, config.label_column)
    rows, digest = _read_rows(config.data_path, columns)
    sha256 = {config.data_path: digest}
    labels = sorted({row.label for row in rows})
    if len(labels) < 2:
        raise TrainingDataError(
            config.data_path,
            f"only one class ({labels[0]!r}) in {len(rows)} rows; a classifier needs at least two",
        )
    if config.validation_path:
        validation, sha256[config.validation_path] = _read_rows(config.validation_path, columns)
        unknown = sorted({row.label for row in validation} - set(labels))
        if unknown:
            raise TrainingDataError(
                config.validation_path, f"labels not in the training file: {', '.join(map(repr, unknown))}"
            )
        return Dataset(rows, validation, labels, sha256)

    rng = random.Random(config.seed)
    by_label: dict[str, list[Example]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    train: list[Example] = []
    validation: list[Example] = []
    for label in labels:  # stratified: every class keeps at least one training row
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = min(len(group) - 1, round(len(group) * config.validation_fraction))
        validation.extend(group[:n_val])
        train.extend(group[n_val:])
    if not validation:
        raise TrainingDataError(
            config.data_path,
            f"{len(rows)} rows leave no validation rows at validation_fraction={config.validation_fraction}",
            "add rows, raise validation_fraction or give validation_path",
        )
    rng.shuffle(train)
    rng.shuffle(validation)
    return Dataset(train, validation, labels, sha256)


class EpochOrder:
    """The training order of one epoch, a function of (seed, epoch) only, so a resumed run sees the same batches.

    With ``lengths``, rows are grouped by length: shuffled, sorted by length within windows of
    GROUP_BATCHES batches, cut into batches, and the full batches shuffled again (the one short
    batch stays last, so every later batch keeps its boundaries). Consecutive runs of
    ``batch_size`` indices are the batches, which is also how accelerate shards them.

    The method is not called ``set_epoch`` on purpose: accelerate calls that itself with its own
    iteration counter, which restarts at zero in a resumed process.
    """

    def __init__(self, size: int, seed: int, batch_size: int = 1, lengths: Sequence[int] | None = None) -> None:
        self.size = size
        self.seed = seed
        self.batch_size = batch_size
        self.lengths = list(lengths) if lengths is not None else None
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        rng.shuffle(order)
        if self.lengths is None:
            return iter(order)
        size, window = self.batch_size, self.batch_size * GROUP_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            group = sorted(order[start:start + window], key=self.lengths.__getitem__, reverse=True)
            batches += [group[i:i + size] for i in range(0, len(group), size)]
        full = [batch for batch in batches if len(batch) == size]
        rng.shuffle(full)
        short = [batch for batch in batches if len(batch) < size]
        return iter([index for batch in full + short for index in batch])

    def __len__(self) -> int:
        return self.size


# -------------------------------------------------------------------------------- checkpoints


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str) -> list[Path]:
    """Checkpoint directories, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
            try:
                found.append((int(child.name[len(CHECKPOINT_PREFIX):]), child))
            except ValueError:
                continue
    return [path for _, path in sorted(found)]


def _checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None. Reads every file so truncation shows up here,
    before any weights are loaded into the live model."""
    import torch
    from safetensors import safe_open

    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text("utf-8"))
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{STATE_FILE} is unreadable: {exc!r}"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():
                        handle.get_tensor(key)
            elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):
                torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure to read means "do not use this one"
            return f"{file.name} is unreadable: {type(exc).__name__}: {exc}"
    return None


def _job_identity(config: TrainConfig, data: Dataset, base_model: str, num_processes: int) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this job (the same data, batches and model)."""
    return {
        "labels": list(data.labels),
        "base_model": base_model,
        "batch_size": config.batch_size,
        "num_processes": num_processes,
        "max_length": config.max_length,
        "group_by_length": config.group_by_length,
        "data_sha256": sorted(data.sha256.values()),
    }


def best_epoch_index(history: Sequence[EpochMetrics]) -> int | None:
    """Index of the best epoch: highest validation macro-F1, then lowest validation loss, then earliest."""
    if not history:
        return None
    return max(range(len(history)), key=lambda i: (history[i].val_macro_f1, -history[i].val_loss, -i))


def should_stop_early(history: Sequence[EpochMetrics], patience: int | None) -> bool:
    """True once ``patience`` epochs in a row have not beaten the best one."""
    best = best_epoch_index(history)
    return patience is not None and best is not None and len(history) - 1 - best >= patience


def snapshot_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / BEST_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def _prune_snapshots(output_dir: str) -> None:
    """Keep the best-epoch snapshot each kept checkpoint refers to; delete the others."""
    wanted = set()
    for checkpoint in list_checkpoints(output_dir):
        try:
            history = [EpochMetrics(**m) for m in json.loads((checkpoint / STATE_FILE).read_text("utf-8"))["history"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        best = best_epoch_index(history)
        if best is not None:
            wanted.add(snapshot_dir(output_dir, history[best].step).name)
    root = Path(output_dir) / BEST_DIR
    for child in root.iterdir() if root.is_dir() else ():
        if child.name not in wanted:
            shutil.rmtree(child, ignore_errors=True)


# ------------------------------------------------------------------------------------ training


class _SigtermFlag:
    """Turns SIGTERM into a flag checked between steps; restores (and later calls) the old handler."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> "_SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            try:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
                self.installed = True
            except ValueError:
                self.installed = False
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)

    def pass_on(self) -> None:
        """After the checkpoint: let the previous handler (e.g. Prefect's) act on the signal."""
        if self.installed and callable(self.previous):
            signal.signal(signal.SIGTERM, self.previous)
            self.installed = False
            self.previous(signal.SIGTERM, None)


def train_classifier(
    config: TrainConfig,
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train (or resume training) and save the best epoch's model under ``<output_dir>/model``.

    Works the same in one process and in each process of ``accelerate launch``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from taskserver.inference import default_base_model

    started = time.perf_counter()
    output_dir = _checkpoint_location(config)
    data = load_dataset(config)
    base_model = config.base_model or default_base_model()

    accelerator = Accelerator()
    set_seed(config.seed)
    tokenizer, model = _load_base(base_model, len(data.labels))
    sampler, train_loader, val_loader = _loaders(config, data, tokenizer)
    optimizer = _optimizer(config, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(total_steps * config.warmup_fraction), max(total_steps, 1)
    )
    scheduler = accelerator.prepare(scheduler)

    identity = _job_identity(config, data, base_model, accelerator.num_processes)
    step, history, epoch_loss, resumed_from = _resume(accelerator, output_dir, identity)
    session = _Session(
        config=config, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        sampler=sampler, train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer, data=data,
        base_model=base_model, output_dir=output_dir, identity=identity,
        report=on_progress if (on_progress is not None and accelerator.is_main_process) else None,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        step=step, history=history, epoch_loss=epoch_loss,
    )
    if session.report:
        session.report(TrainProgress("start", step, total_steps, step // max(steps_per_epoch, 1),
                                     resumed_from_step=resumed_from))
    session.run()
    return session.finish(resumed_from, time.perf_counter() - started)


@dataclass
class _Session:
    """One training job in one process: what ``train_classifier`` prepared, and the loop's state
    (the step, the epochs' metrics, the running epoch's loss), which checkpoints save and resume."""

    config: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    train_loader: Any
    val_loader: Any
    tokenizer: Any
    data: Dataset
    base_model: str
    output_dir: str
    identity: dict[str, Any]
    report: Callable[[TrainProgress], None] | None
    steps_per_epoch: int
    total_steps: int
    step: int
    history: list[EpochMetrics]
    epoch_loss: list[float]
    stop: bool = False

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def run(self) -> None:
        """Train until ``total_steps``, early stopping, or SIGTERM (checkpoint, then raise)."""
        config = self.config
        self.stop = should_stop_early(self.history, config.early_stopping_patience)  # a resumed run that had stopped
        with _SigtermFlag() as sigterm:
            epoch_started = time.perf_counter()
            while self.step < self.total_steps and not self.stop:
                epoch, skip = divmod(self.step, self.steps_per_epoch)
                self.sampler.use_epoch(epoch)
                self.model.train()
                for batch in _skip_batches(self.train_loader, skip):
                    step_loss = _train_step(self.accelerator, self.model, self.optimizer, self.scheduler, batch)
                    self.step += 1
                    self.epoch_loss[0] += step_loss
                    self.epoch_loss[1] += 1
                    if self.report:
                        self.report(TrainProgress("step", self.step, self.total_steps, epoch, loss=step_loss))
                    if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                        self._end_epoch(epoch, time.perf_counter() - epoch_started)
                        epoch_started = time.perf_counter()
                    if sigterm.raised:
                        self.accelerator.set_trigger()
                    interrupted = self.accelerator.check_trigger()
                    if (self.step % config.checkpoint_every == 0 or self.step == self.total_steps
                            or interrupted or self.stop):
                        self.save_checkpoint()
                    if interrupted:
                        sigterm.pass_on()
                        raise TrainingInterrupted(
                            config.output_dir, f"stopped by SIGTERM at step {self.step}; a checkpoint was saved",
                            "run the same job again to resume",
                        )
                    if self.step >= self.total_steps or self.stop:
                        break

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        """Evaluate, record the epoch, decide on early stopping, snapshot a new best model."""
        self.history.append(EpochMetrics(
            epoch=epoch + 1, step=self.step, train_loss=self.epoch_loss[0] / max(self.epoch_loss[1], 1),
            seconds=seconds, **_evaluate(self.accelerator, self.model, self.val_loader),
        ))
        self.epoch_loss = [0.0, 0]
        self.model.train()
        self.stop = should_stop_early(self.history, self.config.early_stopping_patience)
        if self.is_main and self.step < self.total_steps and best_epoch_index(self.history) == len(self.history) - 1:
            _save_snapshot(self.accelerator.unwrap_model(self.model), self.tokenizer, self.output_dir, self.step,
                           self.data, self.base_model, self.config.max_length)
        if self.report:
            self.report(TrainProgress("epoch", self.step, self.total_steps, epoch + 1, metrics=self.history[-1]))

    def save_checkpoint(self) -> Path:
        accelerator, step = self.accelerator, self.step
        path = checkpoint_root(self.output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"
        if self.is_main and path.exists():
            shutil.rmtree(path)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        if self.is_main:
            state = {"step": step, "history": [asdict(m) for m in self.history], "epoch_loss": list(self.epoch_loss),
                     "identity": self.identity, "saved_at": time.time()}
            storage.write_text(str(path / STATE_FILE), json.dumps(state, indent=2))  # written last: "complete"
            for old in list_checkpoints(self.output_dir)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            _prune_snapshots(self.output_dir)
        accelerator.wait_for_everyone()
        if self.report:
            self.report(TrainProgress("checkpoint", step, self.total_steps, step // self.steps_per_epoch,
                                      checkpoint=str(path)))
        return path

    def finish(self, resumed_from: int | None, seconds_so_far: float) -> TrainResult:
        """Save the best epoch's model (the main process) and describe the job."""
        started = time.perf_counter()
        config, data, history, step = self.config, self.data, self.history, self.step
        model_dir = Path(self.output_dir) / MODEL_SUBDIR
        best = best_epoch_index(history)
        kept_step = history[best].step if best is not None else step
        if self.is_main:
            extra = {
                "trained_steps": step,
                "train_rows": len(data.train),
                "validation_rows": len(data.validation),
                "metrics": asdict(history[best]) if best is not None else None,
                "selected_epoch": history[best].epoch if best is not None else None,
                "stopped_early": self.stop,
                "history": [asdict(m) for m in history],
                "data_path": config.data_path,
                "data_sha256": data.sha256,
            }
            kept_step = _save_final(self.accelerator.unwrap_model(self.model), self.tokenizer, model_dir,
                                    self.output_dir, kept_step, step, data, self.base_model, config, extra)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return TrainResult(
            model_dir=str(model_dir),
            steps=step,
            epochs_completed=step // self.steps_per_epoch,
            history=history,
            resumed_from_step=resumed_from,
            seconds=seconds_so_far + time.perf_counter() - started,
            labels=data.labels,
            train_rows=len(data.train),
            validation_rows=len(data.validation),
            num_processes=self.accelerator.num_processes,
            best_epoch=next((m.epoch for m in history if m.step == kept_step), None),
            stopped_early=self.stop,
            data_sha256=data.sha256,
        )


def _checkpoint_location(config: TrainConfig) -> str:
    output_dir = storage.resolve(config.output_dir)
    if storage.is_url(output_dir) and not output_dir.startswith("file://"):
        raise ParameterError(
            config.output_dir, "training writes checkpoints to a filesystem path", "use a local or mounted directory"
        )
    return output_dir.removeprefix("file://")


def _load_base(base_model: str, num_labels: int) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from taskserver.inference import build_model

    try:
        return AutoTokenizer.from_pretrained(base_model), build_model(base_model, num_labels)
    except OSError as exc:
        raise ParameterError(base_model, f"cannot load the base model: {exc}") from exc


def _loaders(config: TrainConfig, data: Dataset, tokenizer: Any) -> tuple[EpochOrder, Any, Any]:
    """The epoch order and the training and validation loaders (validation sorted by length: less padding)."""
    import torch

    label_to_id = {label: i for i, label in enumerate(data.labels)}

    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(
            [row.text for row in batch], padding=True, truncation=True,
            max_length=config.max_length, return_tensors="pt",
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([label_to_id[row.label] for row in batch]),
        }

    def lengths(rows: list[Example]) -> list[int]:
        ids = tokenizer([row.text for row in rows], truncation=True, max_length=config.max_length)["input_ids"]
        return [len(x) for x in ids]

    order = EpochOrder(len(data.train), config.seed, config.batch_size,
                       lengths(data.train) if config.group_by_length else None)
    train_loader = torch.utils.data.DataLoader(data.train, batch_size=config.batch_size, sampler=order,
                                               collate_fn=collate)
    val_lengths = lengths(data.validation)
    validation = [row for _, row in sorted(zip(val_lengths, data.validation), key=lambda pair: pair[0])]
    val_loader = torch.utils.data.DataLoader(validation, batch_size=max(config.batch_size, 32), shuffle=False,
                                             collate_fn=collate)
    return order, train_loader, val_loader


def _optimizer(config: TrainConfig, model: Any) -> Any:
    import torch

    no_decay = ("bias", "LayerNorm.weight", "layer_norm")
    params = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(params, lr=config.learning_rate)


def _train_step(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, batch: dict[str, Any]) -> float:
    """One optimizer step; the loss averaged over processes."""
    import torch

    logits = model(batch["input_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(loss.detach(), reduction="mean").item())


def _save_snapshot(model: Any, tokenizer: Any, output_dir: str, step: int, data: Dataset,
                   base_model: str, max_length: int) -> None:
    """The model of a new best epoch, kept until a later epoch beats it (it may be the one kept in the end)."""
    from taskserver.inference import save_model

    save_model(model, tokenizer, snapshot_dir(output_dir, step), labels=data.labels, base_model=base_model,
               max_length=max_length, extra={"trained_steps": step})


def _save_final(model: Any, tokenizer: Any, model_dir: Path, output_dir: str, best_step: int, step: int,
                data: Dataset, base_model: str, config: TrainConfig, extra: dict[str, Any]) -> int:
    """Write ``<output_dir>/model``: the live model if its epoch is the best, else the best epoch's snapshot.

    Returns the step of the model written."""
    from taskserver.inference import MARKER_FILE, inspect_model_dir, save_model

    snapshot = snapshot_dir(output_dir, best_step)
    if best_step != step:
        try:
            inspect_model_dir(snapshot)
        except TaskserverError as exc:
            _warn(f"the best epoch's model (step {best_step}) is not readable ({exc}); keeping the last epoch's")
            last = extra["history"][-1] if extra.get("history") else None
            extra = {**extra, "metrics": last, "selected_epoch": last["epoch"] if last else None}
        else:
            staging = model_dir.with_name(f".{model_dir.name}-{uuid.uuid4().hex[:8]}")
            shutil.copytree(snapshot, staging)
            marker = staging / MARKER_FILE
            metadata = {**json.loads(marker.read_text("utf-8")), **extra}
            storage.write_text(str(marker), json.dumps(metadata, indent=2, default=str))
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(staging, model_dir)
            return best_step
    save_model(model, tokenizer, model_dir, labels=data.labels, base_model=base_model,
               max_length=config.max_length, extra=extra)
    return step


def _skip_batches(loader: Any, batches: int) -> Any:
    """The rest of an epoch a resumed run is in the middle of."""
    from accelerate import skip_first_batches

    return skip_first_batches(loader, batches) if batches else loader


def _resume(
    accelerator: Any, output_dir: str, identity: dict[str, Any]
) -> tuple[int, list[EpochMetrics], list[float], int | None]:
    """Load the newest usable checkpoint; warn about and skip corrupt ones."""
    checkpoints = list_checkpoints(output_dir)
    for index in reversed(range(len(checkpoints))):
        path = checkpoints[index]
        problem = _checkpoint_problem(path)
        if problem is None:
            state = json.loads((path / STATE_FILE).read_text("utf-8"))
            if state.get("identity") != identity:
                raise ParameterError(
                    output_dir,
                    f"holds checkpoints of a different training job ({state.get('identity')} vs {identity})",
                    "choose a new output_dir, or delete the old checkpoints to start over",
                )
            try:
                accelerator.load_state(str(path))
            except Exception as exc:  # noqa: BLE001
                problem = f"load_state failed: {type(exc).__name__}: {exc}"
            else:
                if accelerator.is_main_process:
                    log.info("Resuming from %s (step %s)", path, state["step"])
                history = [EpochMetrics(**m) for m in state.get("history", [])]
                epoch_loss = list(state.get("epoch_loss") or [0.0, 0])
                return int(state["step"]), history, epoch_loss, int(state["step"])
        if accelerator.is_main_process:
            then = "falling back to the previous one" if index else "no older checkpoint, so training starts from step 0"
            log.warning("Checkpoint %s is corrupt or incomplete (%s); %s", path, problem, then)
            _warn(f"checkpoint {path} is corrupt or incomplete ({problem}); {then}")
    return 0, [], [0.0, 0], None


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _evaluate(accelerator: Any, model: Any, loader: Any) -> dict[str, float]:
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    model.eval()
    predictions, targets, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            preds, labels, loss = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
            predictions.append(preds.cpu())
            targets.append(labels.cpu())
            losses.append(loss.float().cpu())
    y_pred = torch.cat(predictions).numpy()
    y_true = torch.cat(targets).numpy()
    return {
        "val_loss": float(torch.cat(losses).mean()),
        "val_accuracy": float(accuracy_score(y_true, y_pred)),
        "val_macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


# ----------------------------------------------------------------------- several processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(num_processes: int, config_path: str, result_path: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command and environment for ``num_processes`` workers on this machine.

    With GPUs, one process per GPU (NCCL); without, CPU processes over gloo.
    """
    import torch

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--num_processes", str(num_processes), "--main_process_port", str(port),
               "--dynamo_backend", "no"]
    if torch.cuda.is_available():
        command += ["--multi_gpu"] if num_processes > 1 else []
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")
        command += ["--multi_gpu", "--mixed_precision", "no"]
    command += ["-m", "taskserver.training_cli", "--config", config_path, "--result", result_path]
    return command, env


def train_distributed(
    config: TrainConfig,
    num_processes: int,
    on_progress: Callable[[TrainProgress], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run :func:`train_classifier` under ``accelerate launch`` and stream its output.

    Errors raised in the workers come back as the same taskserver exception classes, so a bad
    training set is still a TrainingDataError (never retried) in the caller.
    """
    if num_processes < 1:
        raise ParameterError("num_processes", f"must be at least 1, got {num_processes}")
    load_dataset(config)  # bad data fails fast here, before any process starts
    output_dir = Path(storage.resolve(config.output_dir).removeprefix("file://"))
    launch_dir = output_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    config_path = launch_dir / f"config-{run_id}.json"
    result_path = launch_dir / f"result-{run_id}.json"
    config_path.write_text(config.model_dump_json(indent=2), "utf-8")
    command, env = launch_command(num_processes, str(config_path), str(result_path), free_port())
    tail: deque[str] = deque(maxlen=30)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                if on_progress is not None:
                    on_progress(TrainProgress.from_dict(json.loads(line[len(PROGRESS_PREFIX):])))
                continue
            tail.append(line)
            if on_log is not None:
                on_log(line)
        code = process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        config_path.unlink(missing_ok=True)
    try:
        outcome = json.loads(result_path.read_text("utf-8")) if result_path.exists() else None
    finally:
        result_path.unlink(missing_ok=True)
    if outcome and "result" in outcome and code == 0:
        return TrainResult.from_dict(outcome["result"])
    if outcome and "error" in outcome:
        raise rebuild_error(outcome["error"])
    last = " | ".join(line for line in tail if line.strip())[-2000:]
    raise TaskserverError(
        config.output_dir, f"accelerate launch with {num_processes} processes exited with code {code}: {last}",
        "running it again resumes from the last checkpoint",
    )


def _stop(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def describe_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, TaskserverError):
        return {"type": type(exc).__name__, "input": exc.input, "reason": exc.reason, "hint": exc.hint}
    return {"type": type(exc).__name__, "input": "training", "reason": f"{type(exc).__name__}: {exc}", "hint": None}


def rebuild_error(data: dict[str, Any]) -> TaskserverError:
    """The worker's exception, as the same class when it is one of ours."""
    classes = {name: obj for name, obj in vars(errors).items()
               if isinstance(obj, type) and issubclass(obj, TaskserverError)}
    classes["TrainingInterrupted"] = TrainingInterrupted
    cls = classes.get(str(data.get("type")), TaskserverError)
    return cls(str(data.get("input")), str(data.get("reason")), data.get("hint"))


def run_job(config: TrainConfig, num_processes: int = 1,
            on_progress: Callable[[TrainProgress], None] | None = None,
            on_log: Callable[[str], None] | None = None) -> TrainResult:
    """One entry for callers: in-process for one process, ``accelerate launch`` for more."""
    if num_processes <= 1:
        return train_classifier(config, on_progress=on_progress)
    return train_distributed(config, num_processes, on_progress=on_progress, on_log=on_log)
