"""What every flow shares: retry policy, cache keys on file content, artifacts and progress."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import time
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
from taskserver.errors import TaskserverError, is_retryable


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


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``1 h 05 min``: how long, in words a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """A progress artifact (percentage and time left) plus a log line per step, for long runs.

    ``description`` names what is counted, e.g. ``training steps``; the time left is estimated
    from the rate since the first step counted here (a resumed run's earlier steps do not count).
    """

    def __init__(self, total: int, description: str) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.description = description
        self._started = time.monotonic()
        self._counted_from = 0
        self._id = create_progress_artifact(progress=0.0, description=self.line())
        self._logger = get_run_logger()

    def skip(self, steps: int, note: str = "") -> None:
        """Steps done before this run (a resumed checkpoint): counted, but not in the rate."""
        self.advance(steps, note)
        self._counted_from = self.done
        self._started = time.monotonic()

    def advance(self, steps: int = 1, note: str = "") -> None:
        self.done += steps
        update_progress_artifact(artifact_id=self._id, progress=self.percent, description=self.line())
        self._logger.info("%s %s", self.line(), note)

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.done / self.total)

    def line(self) -> str:
        """``training steps: 12 of 36 (33%), about 1 min 10 s left``."""
        line = f"{self.description}: {self.done} of {self.total} ({self.percent:.0f}%)"
        elapsed = time.monotonic() - self._started
        counted = self.done - self._counted_from
        if self.done >= self.total:
            line += f", done in {duration(elapsed)}"
        elif counted > 0:
            line += f", about {duration(elapsed / counted * (self.total - self.done))} left"
        return line


def chart_markdown(figure: Any, alt: str) -> str:
    """A matplotlib figure as a markdown image (a PNG in a data: URI), which the UI's artifact page shows."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')})"


def new_figure(width: float = 7.0, height: float = 3.2, columns: int = 1) -> Any:
    """``(figure, axes)`` from matplotlib on the Agg backend (no display on workers)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height))


def cluster_sizes_chart(sizes: Sequence[int], shown: int = 100) -> str:
    """Cluster sizes, largest first, as a bar chart (markdown image); at most ``shown`` bars."""
    ordered = sorted(sizes, reverse=True)[:shown]
    figure, axes = new_figure(7.0, 2.8)
    axes.bar(range(len(ordered)), ordered, color="#4c72b0")
    axes.set_xlabel("clusters, largest first" + (f" (the largest {shown})" if len(sizes) > shown else ""))
    axes.set_ylabel("items")
    axes.set_title(f"Cluster sizes ({len(sizes)} clusters, {sum(sizes)} items)")
    axes.set_xticks([])
    return chart_markdown(figure, "Cluster sizes")


def run_link(flow_run_id: Any, text: str) -> str:
    """A markdown link to a flow run's page in the UI (relative, so it works behind any host)."""
    return f"[{text}](/runs/flow-run/{flow_run_id})"


def explain_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` hook: the run's last log line says, in one line, what was wrong and what to do.

    The engine logs the traceback for engineers; a person reading the run page sees this.
    """
    from prefect.logging.loggers import flow_run_logger

    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result may not be readable; the traceback is in the logs
        return
    if isinstance(error, TaskserverError):
        flow_run_logger(flow_run, flow).error(
            "%s did not finish: %s. Fix the input and run it again; the traceback above is for engineers.",
            flow.name, str(error).rstrip("."),
        )


def with_failure_note(hooks: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``@flow`` hooks plus ``explain_failure`` on failure."""
    return {**hooks, "on_failure": [*hooks.get("on_failure", []), explain_failure]}


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
