"""Champion and challenger: promotion by margin, lineage, restore, refused comparisons, and an atomic
switch that a concurrent reader never sees half of."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from text_factory import topic_rows, write_rows
from typer.testing import CliRunner

from taskserver import registry
from taskserver.cli import app
from taskserver.errors import ModelDirectoryError, ModelRegistryError
from taskserver.inference import CHAMPION_FILE, Classifier, build_model, default_base_model, inspect_model_dir, save_model
from taskserver.training import Example, TrainConfig, train_classifier

LABELS = ["cooking", "sports", "weather"]

pytestmark = pytest.mark.torch_threads(2)




def untrained_model(path: Path, labels: list[str]) -> Path:
    """A complete model directory whose head was never trained: a weak champion, made in seconds."""
    import torch
    from transformers import AutoTokenizer

    base = default_base_model()
    torch.manual_seed(1)
    save_model(build_model(base, len(labels)), AutoTokenizer.from_pretrained(base), path, labels=labels,
               base_model=base, max_length=32)
    return path


@pytest.fixture(scope="module")
def strong(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("strong")
    data = write_rows(root / "topics.jsonl", topic_rows(30, seed=0))
    result = train_classifier(TrainConfig(data_path=str(data), output_dir=str(root / "run"), epochs=2,
                                          batch_size=16, max_length=32, validation_fraction=0.2,
                                          checkpoint_every=100))
    return Path(result.model_dir)


@pytest.fixture(scope="module")
def weak(tmp_path_factory) -> Path:
    return untrained_model(tmp_path_factory.mktemp("weak") / "model", LABELS)


@pytest.fixture(scope="module")
def validation() -> list[Example]:
    return [Example(row["text"], row["label"]) for row in topic_rows(8, seed=77)]


def test_first_model_becomes_champion_with_its_lineage(weak, validation, tmp_path):
    served = tmp_path / "served"
    lineage = {"run_id": "run-1", "data_sha256": {"d.jsonl": "ab" * 32}, "parameters": {"epochs": 1}}
    decision = registry.promote(weak, served, validation, margin=0.01, lineage=lineage)
    assert decision.promoted and decision.champion == "v0001" and decision.champion_macro_f1 is None
    assert "no champion yet" in decision.reason
    assert inspect_model_dir(served).version == "v0001"
    recorded = json.loads((served / "versions" / "v0001" / registry.LINEAGE_FILE).read_text())
    assert recorded["run_id"] == "run-1" and recorded["data_sha256"] == lineage["data_sha256"]
    assert recorded["decision"]["challenger_macro_f1"] == pytest.approx(decision.challenger_macro_f1)


def test_better_challenger_is_promoted_the_old_champion_kept_and_restored_with_one_command(
        weak, strong, validation, tmp_path):
    served = tmp_path / "served"
    registry.promote(weak, served, validation, margin=0.01, lineage={"run_id": "weak"})
    decision = registry.promote(strong, served, validation, margin=0.01, lineage={"run_id": "strong"})
    assert decision.promoted, decision.reason
    assert decision.challenger_macro_f1 >= 0.9 > decision.champion_macro_f1 + 0.01
    assert (decision.champion, decision.previous) == ("v0002", "v0001")
    assert Classifier.load(served).info.version == "v0002"
    assert Classifier.load(served).predict(["the striker scored twice"])[0].label == "sports"

    result = CliRunner().invoke(app, ["model", "restore", str(served)])
    assert result.exit_code == 0, result.output
    assert "now serving v0001 (was v0002)" in result.output
    assert Classifier.load(served).info.version == "v0001"  # the cache noticed the switch
    shown = CliRunner().invoke(app, ["model", "show", str(served)])
    assert "* v0001  run weak" in shown.output and "  v0002  run strong" in shown.output
    assert registry.restore(served) == ("v0001", "v0002")  # a second restore undoes the first
    events = [json.loads(line)["event"] for line in (served / registry.HISTORY_FILE).read_text().splitlines()]
    assert events == ["promoted", "promoted", "restored", "restored"]


def test_challenger_that_does_not_beat_the_champion_by_the_margin_leaves_it_serving(strong, validation, tmp_path):
    served = tmp_path / "served"
    registry.promote(strong, served, validation, margin=0.0, lineage={"run_id": "first"})
    pointer = (served / CHAMPION_FILE).read_bytes()
    decision = registry.promote(strong, served, validation, margin=0.0, lineage={"run_id": "same-again"})
    assert not decision.promoted
    assert decision.champion == "v0001" and decision.challenger_macro_f1 == decision.champion_macro_f1
    assert "does not beat it by the margin 0.0: v0001 stays the champion" in decision.reason
    assert (served / CHAMPION_FILE).read_bytes() == pointer
    assert registry.versions(served) == ["v0001"]


def test_challenger_trained_on_other_labels_is_refused_naming_both_label_sets(weak, validation, tmp_path):
    served = tmp_path / "served"
    registry.promote(weak, served, validation, margin=0.01, lineage={})
    other = untrained_model(tmp_path / "two-labels", ["cooking", "sports"])
    with pytest.raises(ModelRegistryError) as info:
        registry.promote(other, served, validation, margin=0.01, lineage={})
    message = str(info.value)
    assert "two-labels" in message and "(cooking, sports) differ from those of the champion v0001" in message
    assert "(cooking, sports, weather)" in message and "promote into a new model_dir" in message
    with pytest.raises(ModelRegistryError, match=r"data\.jsonl: labels \(cooking, sports\) differ"):
        registry.check_challenger_labels(served, ["sports", "cooking"], "data.jsonl")
    assert registry.versions(served) == ["v0001"]


def test_validation_rows_with_labels_the_models_do_not_know_are_named(weak, tmp_path):
    rows = [Example("hello there", "greeting"), Example("a storm is coming", "weather")]
    with pytest.raises(ModelRegistryError, match=r"val\.jsonl: validation labels the model .* does not know: 'greeting'"):
        registry.promote(weak, tmp_path / "served", rows, margin=0.01, lineage={}, validation_source="val.jsonl")
    assert registry.versions(tmp_path / "served") == []


def test_restore_without_a_previous_champion_or_of_an_unknown_version_says_what_to_do(weak, validation, tmp_path):
    served = tmp_path / "served"
    with pytest.raises(ModelRegistryError, match="no champion here"):
        registry.restore(served)
    registry.promote(weak, served, validation, margin=0.01, lineage={})
    with pytest.raises(ModelRegistryError, match="v0001 is the only champion it has had"):
        registry.restore(served)
    with pytest.raises(ModelRegistryError, match=r"no version 'v0009'.*choose one of: v0001"):
        registry.restore(served, "v0009")
    result = CliRunner().invoke(app, ["model", "restore", str(served), "--version", "v0009"])
    assert result.exit_code == 2 and "no version 'v0009'" in result.output


def test_a_half_copied_version_is_never_served(weak, validation, tmp_path):
    served = tmp_path / "served"
    (served / "versions" / ".incoming-deadbeef").mkdir(parents=True)  # a copy cut short
    with pytest.raises(ModelDirectoryError, match="a model registry with no champion yet"):
        inspect_model_dir(served)
    assert registry.versions(served) == []
    registry.promote(weak, served, validation, margin=0.01, lineage={})
    assert inspect_model_dir(served).version == "v0001"


def test_promotions_and_restores_under_concurrent_inference_serve_one_whole_champion_at_a_time(
        weak, strong, validation, tmp_path):
    served = tmp_path / "served"
    registry.promote(weak, served, validation, margin=0.01, lineage={})
    seen: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def infer_until_done() -> None:
        while not done.is_set():
            try:
                classifier = Classifier.load(served)
                prediction = classifier.predict(["bake the bread for forty minutes"])[0]
                assert set(prediction.probabilities) == set(LABELS)
                seen.append(classifier.info.version)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return

    reader = threading.Thread(target=infer_until_done)
    reader.start()
    try:
        assert registry.promote(strong, served, validation, margin=0.01, lineage={}).promoted
        for _ in range(3):
            registry.restore(served)
    finally:
        done.set()
        reader.join(timeout=120)
    assert not failures, failures
    assert seen and set(seen) <= {"v0001", "v0002"}
    assert Classifier.load(served).info.version == "v0001"  # after promote + 3 restores
