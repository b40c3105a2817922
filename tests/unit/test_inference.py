"""Batch classification with a saved model: correct labels, proper probabilities, clear model-dir errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from taskserver.errors import ModelDirectoryError
from taskserver.inference import HEAD_FILE, LABEL_MAP_FILE, MARKER_FILE, Classifier, default_base_model, infer_file
from taskserver.training import TrainConfig, train_classifier
from text_factory import topic_rows



sentences = topic_rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sentences(40, seed=0)))
    result = train_classifier(TrainConfig(
        data_path=str(data), output_dir=str(root / "run"), epochs=2, batch_size=16, max_length=32,
        checkpoint_every=100, validation_fraction=0.25, learning_rate=1e-4,
    ))
    return Path(result.model_dir)


def test_predictions_match_labels_on_training_like_texts(model_dir):
    rows = sentences(10, seed=123)  # new combinations, not the training rows
    predictions = Classifier.load(model_dir).predict([row["text"] for row in rows], batch_size=7)
    correct = sum(p.label == row["label"] for p, row in zip(predictions, rows))
    assert correct / len(rows) >= 0.9


def test_probabilities_cover_every_label_and_sum_to_one(model_dir):
    predictions = Classifier.load(model_dir).predict(["a storm is coming", "chop the onions", "ok"])
    for prediction in predictions:
        assert set(prediction.probabilities) == {"cooking", "sports", "weather"}
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)


def test_load_is_cached_per_model_directory(model_dir):
    assert Classifier.load(model_dir) is Classifier.load(str(model_dir))


def test_infer_file_writes_ids_labels_and_probabilities(model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "heavy rain and strong winds"}\n\n{"id": "b", "text": "bake the bread"}\n')
    output = infer_file(str(model_dir), str(source), str(tmp_path / "out" / "predictions.jsonl"))
    rows = [json.loads(line) for line in Path(output).read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in rows] == [("a", "weather"), ("b", "cooking")]
    assert all(set(r["probabilities"]) == {"cooking", "sports", "weather"} for r in rows)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["predictions.jsonl"]  # no temporary left behind


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(ModelDirectoryError, match=r"nothing-here: model directory not found"):
        Classifier.load(tmp_path / "nothing-here")


def test_directory_not_written_by_the_trainer_is_rejected():
    base = default_base_model()  # a real model directory, but no taskserver marker
    with pytest.raises(ModelDirectoryError) as info:
        Classifier.load(base)
    assert base in str(info.value) and MARKER_FILE in str(info.value)


def test_label_map_that_disagrees_with_the_marker_is_rejected(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    (copy / LABEL_MAP_FILE).write_text(json.dumps({"id2label": {"0": "sports", "1": "cooking", "2": "weather"}}))
    with pytest.raises(ModelDirectoryError, match="does not match"):
        Classifier.load(copy)


def test_missing_weights_are_named(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    (copy / HEAD_FILE).unlink()
    with pytest.raises(ModelDirectoryError, match=f"missing files: {HEAD_FILE}"):
        Classifier.load(copy)
