"""taskserver's own request-lane tasks, ``encode`` and ``infer``, registered like any package's
(``TaskType.request_handler`` in ``platform.tasks.BUILTIN_TASKS``).

The calls are the library's own (``taskserver.encoding.encode_texts``, ``taskserver.inference
.Classifier``), so a batch gives exactly what the library gives for the same texts in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from taskserver import encoding
from taskserver.errors import ModelDirectoryError
from taskserver.inference import Classifier
from taskserver.platform.request_lane.catalogue import RequestHandler, Result, check_texts
from taskserver.settings import get_settings


class EncodeRequest(BaseModel):
    """Texts to 384-d embeddings (``taskserver.encoding.encode_texts``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Any] = Field(description="Texts to embed, one vector each.")
    normalize: bool = Field(default=True, description="Unit-length vectors (cosine similarity is a dot product).")


class InferRequest(BaseModel):
    """Texts to labels and probabilities with a trained classifier (``taskserver.inference``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Any] = Field(description="Texts to classify.")
    model_dir: str = Field(min_length=1, description="A served model location (the train flow's model_dir).")


def _split(rows: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    parts, start = [], 0
    for size in sizes:
        parts.append(list(rows[start:start + size]))
        start += size
    return parts


def encode_batch(params: Sequence[EncodeRequest]) -> list[Result]:
    """All texts of the batch in one ``encode_texts`` call (requests share ``normalize``)."""
    texts = [text for p in params for text in p.texts]
    embeddings = encoding.encode_texts(texts, normalize=params[0].normalize,
                                       batch_size=get_settings().embedding_batch_size)
    return [{"embeddings": [row.tolist() for row in part], "model": embeddings.model}
            for part in _split(embeddings.vectors, [len(p.texts) for p in params])]


def infer_batch(params: Sequence[InferRequest]) -> list[Result]:
    """All texts of the batch through one classifier (requests share ``model_dir``)."""
    classifier = Classifier.load(params[0].model_dir)
    predictions = classifier.predict([text for p in params for text in p.texts], batch_size=64)
    return [{"predictions": [{"label": p.label, "probabilities": p.probabilities} for p in part],
             "model_dir": classifier.info.model_dir, "model_version": classifier.info.version}
            for part in _split(predictions, [len(p.texts) for p in params])]


def warm_up_encoder() -> None:
    """Load the encoder and run it once, so the first request does not pay for it."""
    encoding.encode_texts(["warm up"], batch_size=get_settings().embedding_batch_size)


ENCODE = RequestHandler(
    params=EncodeRequest, batch=encode_batch, batch_key=lambda p: f"normalize={p.normalize}",
    size=lambda p: len(p.texts), check=lambda p: check_texts(p.texts), warm_up=warm_up_encoder,
)
INFER = RequestHandler(
    params=InferRequest, batch=infer_batch, batch_key=lambda p: f"model_dir={p.model_dir}",
    size=lambda p: len(p.texts), check=lambda p: check_texts(p.texts), whole_batch_errors=(ModelDirectoryError,),
)
