"""What every flow shares: retry policy, cache keys on file content, artifacts and progress."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext

from taskserver import storage
from taskserver.errors import is_retryable


def retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry transient errors, never bad input or a full disk."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_retryable(exc)
    return False


def file_fingerprint(location: str) -> str:
    """Content-addressed identity of a file: a change to the bytes changes the cache key."""
    fs, path = storage.filesystem(location)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return f"missing:{location}"
    checksum = info.get("ETag") or info.get("md5") or ""
    if not checksum and os.path.exists(path):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        checksum = digest.hexdigest()
    return f"{storage.resolve(location)}:{info.get('size')}:{checksum}"


def cache_key_on_files(*file_parameters: str):
    """A cache key function hashing the named parameters, reading file contents for path parameters."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        digest = hashlib.sha256(context.task.fn.__qualname__.encode())
        for name in sorted(parameters):
            value = parameters[name]
            if name in file_parameters:
                values = value if isinstance(value, (list, tuple)) else [value]
                for item in values:
                    digest.update(file_fingerprint(str(item)).encode())
            else:
                digest.update(f"{name}={value!r}".encode())
        return digest.hexdigest()

    return key


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |")
    return "\n".join(lines)


def publish_summary(key: str, title: str, markdown: str) -> None:
    """A markdown artifact a person reads in the UI; ``key`` is lowercase-with-dashes."""
    create_markdown_artifact(key=key, markdown=f"# {title}\n\n{markdown}", description=title)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)


class Progress:
    """A progress artifact plus a log line per step, for long runs."""

    def __init__(self, total: int, description: str) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.description = description
        self._id = create_progress_artifact(progress=0.0, description=description)
        self._logger = get_run_logger()

    def advance(self, steps: int = 1, note: str = "") -> None:
        self.done += steps
        percent = min(100.0, 100.0 * self.done / self.total)
        update_progress_artifact(artifact_id=self._id, progress=percent)
        self._logger.info("%s: %d/%d (%.0f%%) %s", self.description, self.done, self.total, percent, note)


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger: Any) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, "%s", record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


@contextlib.contextmanager
def library_logs_in_run(name: str = "taskserver") -> Iterator[None]:
    """Show the library's log lines (a checkpoint skipped as corrupt, ...) in the run's logs in the UI.

    Library modules log to plain ``logging`` (they never import Prefect); without this their
    warnings reach only the worker's stderr, where nobody looking at the run sees them.
    """
    library = logging.getLogger(name)
    handler = _ToRunLogger(get_run_logger())
    previous = library.level
    if library.getEffectiveLevel() > logging.INFO:
        library.setLevel(logging.INFO)
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(previous)
