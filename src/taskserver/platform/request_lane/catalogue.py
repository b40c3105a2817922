"""What a request may carry: its task, priority and parameters, checked before it is queued and again when drained.

Each request task has a typed parameter model and a batch key: requests with the same key (same
task, same options or model) can share one model call. Every check raises an error from
``taskserver.errors`` that names the request's input and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskserver import encoding
from taskserver.errors import EncodingInputError, ParameterError
from taskserver.platform.priorities import DEFAULT_PRIORITY, get_priority
from taskserver.settings import get_settings


class EncodeRequest(BaseModel):
    """Texts to 384-d embeddings (``taskserver.encoding.encode_texts``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Any] = Field(description="Texts to embed, one vector each.")
    normalize: bool = Field(default=True, description="Unit-length vectors (cosine similarity is a dot product).")

    @property
    def batch_key(self) -> str:
        return f"encode:normalize={self.normalize}"


class InferRequest(BaseModel):
    """Texts to labels and probabilities with a trained classifier (``taskserver.inference``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Any] = Field(description="Texts to classify.")
    model_dir: str = Field(min_length=1, description="A served model location (the train flow's model_dir).")

    @property
    def batch_key(self) -> str:
        return f"infer:model_dir={self.model_dir}"


REQUEST_TASKS: dict[str, type[BaseModel]] = {"encode": EncodeRequest, "infer": InferRequest}
"""The tasks the request lane serves; anything heavier is a flow run."""


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed every check: what the queue stores."""

    task: str
    priority: str
    rank: int
    """The priority's queue number: a lower number is served first."""
    params: EncodeRequest | InferRequest

    @property
    def batch_key(self) -> str:
        return self.params.batch_key

    @property
    def size(self) -> int:
        return len(self.params.texts)


def prepare(task: Any, params: Any, priority: Any = DEFAULT_PRIORITY) -> PreparedRequest:
    """Check one request; raise a ``ParameterError`` or ``EncodingInputError`` naming what is wrong."""
    if not isinstance(task, str) or task not in REQUEST_TASKS:
        raise ParameterError.not_in(f"task {task!r}", "not a request-lane task", REQUEST_TASKS)
    if not isinstance(priority, str):
        raise ParameterError("priority", f"expected a priority name, got {type(priority).__name__}")
    level = get_priority(priority)
    if not isinstance(params, dict):
        raise ParameterError("params", f"expected a JSON object, got {type(params).__name__}",
                             f"e.g. {{\"texts\": [\"a text\"]}} for {task}")
    _check_size(params)
    try:
        model = REQUEST_TASKS[task].model_validate(params)
    except ValidationError as exc:
        raise _parameter_error(task, exc) from None
    _check_texts(model.texts)
    return PreparedRequest(task, level.name, level.queue_priority, model)


def _check_size(params: dict[str, Any]) -> None:
    limit = get_settings().request_max_bytes
    size = len(json.dumps(params, ensure_ascii=False).encode("utf-8"))
    if size > limit:
        raise ParameterError("params", f"{size:,} bytes of parameters, over the limit of {limit:,}",
                             "pass large inputs as a file to a flow run (`taskserver submit encode"
                             " --param input_path=...`)")


def _check_texts(texts: list[Any]) -> None:
    limit = get_settings().request_max_texts
    if not texts:
        raise EncodingInputError("params.texts", "no texts", "pass at least one non-empty string")
    if len(texts) > limit:
        raise ParameterError("params.texts", f"{len(texts)} texts, over the limit of {limit} per request",
                             "split them over several requests, or use a flow run")
    ids = [str(index) for index in range(len(texts))]
    bad = encoding.check_texts(texts, ids, "params.texts")
    if bad:
        raise encoding.bad_texts_error(bad, len(texts))


def _parameter_error(task: str, exc: ValidationError) -> ParameterError:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "params"
        problems.append(f"params.{where}: {error['msg']}")
    fields = ", ".join(REQUEST_TASKS[task].model_fields)
    return ParameterError(f"{task} request", "; ".join(problems), f"{task} takes: {fields}")
