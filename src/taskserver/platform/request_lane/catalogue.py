"""What a request may carry: its task, priority and parameters, checked before it is queued and again when drained.

A task serves requests when its ``TaskType`` names a ``RequestHandler`` (``request_handler``): a
typed parameter model, a batch key (requests with the same key share one library call) and the
batch function. taskserver's own ``encode`` and ``infer`` register theirs exactly as an installed
package does (``request_lane.builtin``). Every check raises an error from ``taskserver.errors``
that names the request's input and the reason.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError

from taskserver import encoding
from taskserver.errors import EncodingInputError, ParameterError
from taskserver.platform.priorities import DEFAULT_PRIORITY, get_priority
from taskserver.platform.tasks import catalogue
from taskserver.settings import get_settings

Result = dict[str, Any]

_log = logging.getLogger(__name__)


def _text_count(params: BaseModel) -> int:
    return len(getattr(params, "texts", None) or ()) or 1


@dataclass(frozen=True)
class RequestHandler:
    """How the request lane serves one task: what a request carries and one call per batch.

    ``batch`` gets the parameters of requests with the same ``batch_key`` (at most the drainer's
    batch size, in queue order) and returns one JSON-able result per request, in that order.
    """

    params: type[BaseModel]
    """The request's parameters; ``extra="forbid"`` and field descriptions make good errors."""
    batch: Callable[[Sequence[Any]], list[Result]]
    batch_key: Callable[[Any], str] = lambda params: ""
    """Requests with the same key may share one call (same model, same options)."""
    size: Callable[[Any], int] = _text_count
    """How much work one request is (its texts); the limit on texts per request applies to it."""
    check: Callable[[Any], None] | None = None
    """A check beyond the model's own, raising an error from ``taskserver.errors``."""
    whole_batch_errors: tuple[type[Exception], ...] = ()
    """Errors about what the batch shares (its model): every request gets them, no retry one by one."""
    warm_up: Callable[[], None] | None = None
    """Called once as a drainer starts, so the first request does not pay for loading."""


def load_handler(reference: str) -> RequestHandler:
    """The ``RequestHandler`` a ``TaskType.request_handler`` names (``package.module:NAME``)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ParameterError(f"request handler {reference!r}", "is not of the form package.module:NAME")
    try:
        handler = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ParameterError(f"request handler {reference!r}", f"does not load: {type(exc).__name__}: {exc}") from None
    if not isinstance(handler, RequestHandler):
        raise ParameterError(f"request handler {reference!r}",
                             f"is a {type(handler).__name__}, not a taskserver RequestHandler")
    if not (isinstance(handler.params, type) and issubclass(handler.params, BaseModel)):
        raise ParameterError(f"request handler {reference!r}", "its params is not a pydantic model class")
    return handler


@lru_cache(maxsize=1)
def request_tasks() -> dict[str, RequestHandler]:
    """The installed catalogue's tasks that serve requests, with their handlers, loaded once per process.

    A handler that does not load is left out with a warning; the bootstrap refuses its package
    (``registration.verify``), so this only happens to an install changed since.
    """
    handlers: dict[str, RequestHandler] = {}
    for task in catalogue().tasks:
        if not task.request_handler:
            continue
        try:
            handlers[task.name] = load_handler(task.request_handler)
        except ParameterError as exc:
            _log.warning("task %r serves no requests: %s", task.name, exc)
    return handlers


def request_task_names() -> list[str]:
    return list(request_tasks())


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed every check: what the queue stores."""

    task: str
    priority: str
    rank: int
    """The priority's queue number: a lower number is served first."""
    params: BaseModel
    handler: RequestHandler = field(repr=False, compare=False)

    @property
    def batch_key(self) -> str:
        return f"{self.task}:{self.handler.batch_key(self.params)}"

    @property
    def size(self) -> int:
        return self.handler.size(self.params)


def prepare(task: Any, params: Any, priority: Any = DEFAULT_PRIORITY) -> PreparedRequest:
    """Check one request; raise a ``ParameterError`` or ``EncodingInputError`` naming what is wrong."""
    handlers = request_tasks()
    if not isinstance(task, str) or task not in handlers:
        raise ParameterError.not_in(f"task {task!r}", "not a request-lane task", handlers)
    handler = handlers[task]
    if not isinstance(priority, str):
        raise ParameterError("priority", f"expected a priority name, got {type(priority).__name__}")
    level = get_priority(priority)
    if not isinstance(params, dict):
        raise ParameterError("params", f"expected a JSON object, got {type(params).__name__}",
                             f"e.g. {{\"texts\": [\"a text\"]}} for {task}")
    _check_size(params)
    try:
        model = handler.params.model_validate(params)
    except ValidationError as exc:
        raise _parameter_error(task, handler, exc) from None
    _check_count(handler.size(model))
    if handler.check is not None:
        handler.check(model)
    return PreparedRequest(task, level.name, level.queue_priority, model, handler)


def _check_size(params: dict[str, Any]) -> None:
    limit = get_settings().request_max_bytes
    size = len(json.dumps(params, ensure_ascii=False).encode("utf-8"))
    if size > limit:
        raise ParameterError("params", f"{size:,} bytes of parameters, over the limit of {limit:,}",
                             "pass large inputs as a file to a flow run (`taskserver submit encode"
                             " --param input_path=...`)")


def _check_count(count: int) -> None:
    limit = get_settings().request_max_texts
    if count > limit:
        raise ParameterError("params.texts", f"{count} texts, over the limit of {limit} per request",
                             "split them over several requests, or use a flow run")


def check_texts(texts: list[Any]) -> None:
    """Texts a request sends to a text model: at least one, each a non-empty string (encode, infer)."""
    if not texts:
        raise EncodingInputError("params.texts", "no texts", "pass at least one non-empty string")
    ids = [str(index) for index in range(len(texts))]
    bad = encoding.check_texts(texts, ids, "params.texts")
    if bad:
        raise encoding.bad_texts_error(bad, len(texts))


def _parameter_error(task: str, handler: RequestHandler, exc: ValidationError) -> ParameterError:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "params"
        problems.append(f"params.{where}: {error['msg']}")
    fields = ", ".join(handler.params.model_fields)
    return ParameterError(f"{task} request", "; ".join(problems), f"{task} takes: {fields}")
