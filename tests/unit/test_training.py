"""Fine-tuning on a tiny synthetic task: learning, checkpoints, automatic resume, data errors, 2 processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from text_factory import topic_rows, write_rows

from taskserver.errors import TrainingDataError
from taskserver.inference import LABEL_MAP_FILE, MARKER_FILE, Classifier
from taskserver.training import (
    STATE_FILE,
    TrainConfig,
    TrainingInterrupted,
    TrainProgress,
    list_checkpoints,
    train_classifier,
    train_distributed,
)

pytestmark = pytest.mark.torch_threads(2)



def write_topics(path: Path, per_class: int = 40, seed: int = 0) -> Path:
    """Three classes of short two-phrase sentences, shuffled: a clear signal a few steps can learn."""
    rows = topic_rows(per_class, seed)
    random.Random(seed).shuffle(rows)
    return write_rows(path, rows)


def config_for(data: Path, out: Path, **overrides) -> TrainConfig:
    # 90 training rows / 16 per step = 6 steps per epoch; 2 epochs = 12 steps; checkpoints at 4, 8, 12.
    values = dict(data_path=str(data), output_dir=str(out), epochs=2, batch_size=16, max_length=32,
                  checkpoint_every=4, keep_checkpoints=2, validation_fraction=0.25, learning_rate=1e-4, seed=0)
    values.update(overrides)
    return TrainConfig(**values)




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_topics(tmp_path_factory.mktemp("data") / "topics.jsonl")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One uninterrupted run: the reference every resume test compares with."""
    out = tmp_path_factory.mktemp("trained")
    events: list[TrainProgress] = []
    result = train_classifier(config_for(data, out), on_progress=events.append)
    return out, result, events


def test_training_learns_the_synthetic_task_and_reports_metrics_per_epoch(trained):
    _, result, events = trained
    assert result.steps == 12 and result.epochs_completed == 2
    assert [m.epoch for m in result.history] == [1, 2]
    assert [m.step for m in result.history] == [6, 12]
    assert result.history[-1].val_accuracy >= 0.8  # chance is 1/3
    assert result.history[-1].val_macro_f1 >= 0.8
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.resumed_from_step is None
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 13))
    assert [e.metrics.epoch for e in events if e.kind == "epoch"] == [1, 2]


def test_checkpoints_every_n_steps_and_only_the_newest_are_kept(trained):
    out, _, events = trained
    assert [e.step for e in events if e.kind == "checkpoint"] == [4, 8, 12]
    assert [p.name for p in list_checkpoints(str(out))] == ["step-000008", "step-000012"]
    state = json.loads((out / "checkpoints" / "step-000012" / STATE_FILE).read_text())
    assert state["step"] == 12 and len(state["history"]) == 2


def test_final_model_is_saved_with_label_map_and_marker(trained):
    out, result, _ = trained
    model_dir = Path(result.model_dir)
    assert model_dir == out / "model"
    label_map = json.loads((model_dir / LABEL_MAP_FILE).read_text())
    assert label_map["id2label"] == {"0": "cooking", "1": "sports", "2": "weather"}
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    assert marker["labels"] == ["cooking", "sports", "weather"]
    assert marker["max_length"] == 32 and marker["trained_steps"] == 12
    assert marker["metrics"]["val_accuracy"] == pytest.approx(result.history[-1].val_accuracy)
    prediction = Classifier.load(model_dir).predict(["the goalkeeper and the striker scored a goal"])[0]
    assert prediction.label == "sports"


def test_rerunning_a_finished_job_resumes_at_its_end_instead_of_retraining(trained, data):
    out, result, _ = trained
    again = train_classifier(config_for(data, out))
    assert again.resumed_from_step == 12
    assert again.steps == 12
    assert [m.epoch for m in again.history] == [1, 2]


def test_crash_mid_training_then_rerun_resumes_from_latest_checkpoint(trained, data, tmp_path):
    _, reference, _ = trained

    class Crash(Exception):
        pass

    def crash_at_step_7(event: TrainProgress) -> None:
        if event.kind == "step" and event.step == 7:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train_classifier(config_for(data, tmp_path), on_progress=crash_at_step_7)
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-000004"]
    assert not (tmp_path / "model").exists()

    resumed = train_classifier(config_for(data, tmp_path))
    assert resumed.resumed_from_step == 4
    assert resumed.steps == reference.steps == 12
    assert [m.epoch for m in resumed.history] == [1, 2]
    assert resumed.history[-1].val_accuracy >= 0.8
    assert (tmp_path / "model" / MARKER_FILE).is_file()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(trained, data, tmp_path):
    out, _, _ = trained
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    weights = tmp_path / "checkpoints" / "step-000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 5000])  # a write cut short

    with pytest.warns(RuntimeWarning, match=r"step-000012 is corrupt or incomplete.*falling back"):
        result = train_classifier(config_for(data, tmp_path))
    assert result.resumed_from_step == 8
    assert result.steps == 12


def test_sigterm_saves_a_checkpoint_exits_non_zero_and_the_rerun_resumes(data, tmp_path):
    config = config_for(data, tmp_path, checkpoint_every=3, epochs=3)  # 18 steps
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    result_path = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "taskserver.training_cli", "--config", str(config_path), "--result", str(result_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        first = tmp_path / "checkpoints" / "step-000003" / STATE_FILE
        deadline = time.monotonic() + 300
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "no checkpoint appeared"
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 143
    error = json.loads(result_path.read_text())["error"]
    assert error["type"] == TrainingInterrupted.__name__ and "SIGTERM" in error["reason"]
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(str(tmp_path))]
    interrupted_at = max(saved)
    assert 3 <= interrupted_at < 18

    resumed = train_classifier(config)
    assert resumed.resumed_from_step == interrupted_at
    assert resumed.steps == 18


@pytest.mark.parametrize(
    ("content", "name", "overrides", "reason"),
    [
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "one.jsonl", {}, "only one class ('x')"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n', "gap.jsonl", {}, "line 2: missing label"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', "null.jsonl", {}, "line 2: missing label"),
        ("text,label\na,x\nb,y\n", "cols.csv", {"label_column": "topic"}, "unknown label column 'topic'"),
        ("body,label\na,x\nb,y\n", "text.csv", {}, "unknown text column 'text'"),
        ('{"body": "a", "label": "x"}\n', "field.jsonl", {}, "unknown text column 'text'"),
        ("", "empty.jsonl", {}, "the file is empty"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label"\n', "broken.jsonl", {}, "line 2: not valid JSON"),
    ],
)
def test_bad_training_data_fails_naming_the_file_and_reason(tmp_path, content, name, overrides, reason):
    path = tmp_path / name
    path.write_text(content, "utf-8")
    with pytest.raises(TrainingDataError) as info:
        train_classifier(config_for(path, tmp_path / "out", **overrides))
    assert name in str(info.value) and reason in str(info.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_and_unreadable_files_fail_naming_the_file(tmp_path):
    with pytest.raises(TrainingDataError, match=r"nowhere\.jsonl: file not found"):
        train_classifier(config_for(tmp_path / "nowhere.jsonl", tmp_path / "out"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"text,label\n\xff\xfe\x00bad,x\n")
    with pytest.raises(TrainingDataError, match=r"binary\.csv: not UTF-8"):
        train_classifier(config_for(binary, tmp_path / "out"))


def test_validation_labels_missing_from_training_are_named(data, tmp_path):
    validation = tmp_path / "val.jsonl"
    validation.write_text('{"text": "hello", "label": "greeting"}\n')
    with pytest.raises(TrainingDataError, match=r"val\.jsonl: labels not in the training file: 'greeting'"):
        train_classifier(config_for(data, tmp_path / "out", validation_path=str(validation)))


def test_two_processes_under_accelerate_launch_train_and_save_a_model(data, tmp_path):
    config = config_for(data, tmp_path, batch_size=8, max_steps=4, checkpoint_every=2)
    events: list[TrainProgress] = []
    result = train_distributed(config, 2, on_progress=events.append)
    assert result.num_processes == 2
    assert result.steps == 4
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-000002", "step-000004"]
    classifier = Classifier.load(result.model_dir)
    assert classifier.labels == ["cooking", "sports", "weather"]
    assert len(classifier.predict(["a storm is coming"])) == 1


def test_the_best_epoch_is_kept_and_training_stops_once_it_is_not_beaten(data, tmp_path):
    """Validation labels are a permutation of the true ones, so every epoch of learning makes
    validation worse: epoch 1 is the best, patience 1 stops after epoch 2 of 3, and the saved model
    is epoch 1's, not the last one's."""
    permuted = {"cooking": "sports", "sports": "weather", "weather": "cooking"}
    validation = write_rows(tmp_path / "val.jsonl", [{"text": r["text"], "label": permuted[r["label"]]}
                                                      for r in topic_rows(6, seed=5)])
    config = config_for(data, tmp_path / "run", epochs=3, validation_path=str(validation),
                        early_stopping_patience=1, checkpoint_every=100)
    result = train_classifier(config)
    assert result.stopped_early and result.steps == 16 and [m.epoch for m in result.history] == [1, 2]
    first, second = result.history
    assert (first.val_macro_f1, -first.val_loss) > (second.val_macro_f1, -second.val_loss)
    assert result.best_epoch == 1 and result.best == first
    marker = json.loads((Path(result.model_dir) / MARKER_FILE).read_text())
    assert marker["selected_epoch"] == 1 and marker["stopped_early"] is True
    assert marker["metrics"]["val_loss"] == pytest.approx(first.val_loss) and marker["trained_steps"] == 16
    snapshot = tmp_path / "run" / "best" / "step-000008"
    assert (Path(result.model_dir) / "model.safetensors").read_bytes() == (snapshot / "model.safetensors").read_bytes()

    again = train_classifier(config)  # a finished, early-stopped job stays finished
    assert again.resumed_from_step == 16 and again.steps == 16 and again.best_epoch == 1


def test_length_grouped_order_covers_every_row_once_is_seeded_and_pads_less():
    from taskserver.training import EpochOrder

    rng = random.Random(3)
    lengths = [rng.randint(4, 128) for _ in range(1000)]
    grouped = EpochOrder(len(lengths), seed=7, batch_size=16, lengths=lengths)
    plain = EpochOrder(len(lengths), seed=7, batch_size=16)

    def padding(order: list[int]) -> int:
        batches = [order[i:i + 16] for i in range(0, len(order), 16)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    first = list(grouped)
    assert sorted(first) == list(range(1000))
    assert list(EpochOrder(len(lengths), seed=7, batch_size=16, lengths=lengths)) == first  # same seed, same batches
    grouped.use_epoch(1)
    assert list(grouped) != first and sorted(grouped) == list(range(1000))
    assert padding(first) < 0.2 * padding(list(plain))
    # the one short batch comes last, so every full batch keeps its boundaries
    assert len([first[i:i + 16] for i in range(0, 1000, 16)][-1]) == 1000 % 16
