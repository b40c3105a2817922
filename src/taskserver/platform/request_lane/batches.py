"""One model call per batch of compatible requests, split back into one result (or error) per request.

The calls are the library's own (``taskserver.encoding.encode_texts``, ``taskserver.inference
.Classifier``), so a batch gives exactly what the library gives for the same texts in the same
order. A batch-wide failure that is not the whole batch's fault (one text crashing the model) is
retried request by request, so one request never fails the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from taskserver import encoding
from taskserver.errors import ModelDirectoryError, TaskserverError
from taskserver.inference import Classifier
from taskserver.platform.request_lane.catalogue import EncodeRequest, InferRequest, PreparedRequest
from taskserver.settings import get_settings

Result = dict[str, Any]
Failure = dict[str, Any]


def error_record(exc: BaseException) -> Failure:
    """An exception as the row stores it: its class, the input, the reason, the hint, the message."""
    if isinstance(exc, TaskserverError):
        return {"type": type(exc).__name__, "input": exc.input, "reason": exc.reason, "hint": exc.hint,
                "message": str(exc)}
    return {"type": type(exc).__name__, "input": "request", "reason": f"{type(exc).__name__}: {exc}",
            "hint": "an unexpected error in the drainer; see its log", "message": f"request: {exc}"}


def _split(rows: Sequence[Any], requests: Sequence[PreparedRequest]) -> list[list[Any]]:
    parts, start = [], 0
    for request in requests:
        parts.append(list(rows[start:start + request.size]))
        start += request.size
    return parts


def encode_batch(requests: Sequence[PreparedRequest]) -> list[Result]:
    """All texts of the batch in one ``encode_texts`` call (requests share ``normalize``)."""
    params = [r.params for r in requests]
    assert all(isinstance(p, EncodeRequest) for p in params)
    texts = [text for p in params for text in p.texts]
    embeddings = encoding.encode_texts(texts, normalize=params[0].normalize,
                                       batch_size=get_settings().embedding_batch_size)
    return [{"embeddings": [row.tolist() for row in part], "model": embeddings.model}
            for part in _split(embeddings.vectors, requests)]


def infer_batch(requests: Sequence[PreparedRequest]) -> list[Result]:
    """All texts of the batch through one classifier (requests share ``model_dir``)."""
    params = [r.params for r in requests]
    assert all(isinstance(p, InferRequest) for p in params)
    classifier = Classifier.load(params[0].model_dir)
    predictions = classifier.predict([text for p in params for text in p.texts], batch_size=64)
    return [{"predictions": [{"label": p.label, "probabilities": p.probabilities} for p in part],
             "model_dir": classifier.info.model_dir, "model_version": classifier.info.version}
            for part in _split(predictions, requests)]


def warm_up() -> None:
    """Load the encoder and run it once, so the first request does not pay for it."""
    encoding.encode_texts(["warm up"], batch_size=get_settings().embedding_batch_size)


BATCH_FUNCTIONS: dict[str, Callable[[Sequence[PreparedRequest]], list[Result]]] = {
    "encode": encode_batch, "infer": infer_batch,
}

_WHOLE_BATCH_ERRORS = (ModelDirectoryError,)
"""Errors about what the batch shares (its model): every request gets it, no retry one by one."""


def run_batch(requests: Sequence[PreparedRequest]) -> list[tuple[Result | None, Failure | None]]:
    """Each request's (result, None), or (None, its own error record)."""
    function = BATCH_FUNCTIONS[requests[0].task]
    try:
        return [(result, None) for result in function(requests)]
    except _WHOLE_BATCH_ERRORS as exc:
        return [(None, error_record(exc)) for _ in requests]
    except Exception as exc:  # noqa: BLE001 - isolate the request that caused it
        if len(requests) == 1:
            return [(None, error_record(exc))]
    outcomes: list[tuple[Result | None, Failure | None]] = []
    for request in requests:
        try:
            outcomes.append((function([request])[0], None))
        except Exception as exc:  # noqa: BLE001 - it is this request's own error now
            outcomes.append((None, error_record(exc)))
    return outcomes
