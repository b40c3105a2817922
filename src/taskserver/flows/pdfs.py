"""The ``process-pdfs`` flow: PDFs to chunks on shared storage, one task per file.

The CPU work runs in forked worker processes (taskserver.documents.PdfWorkerPool); Prefect tasks
give each file its own state, retries on transient errors and a cache keyed on the file's bytes.
Passwords of encrypted files come from Prefect Secret blocks, named in the parameters: only the
block names are ever parameters, and the task that opens a file reads its password itself.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.context import get_run_context
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from taskserver import documents, storage
from taskserver.errors import BatchFailedError, DocumentError, ParameterError, StorageFullError
from taskserver.flows.forms import OptionalNames, OptionalText
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver.flows.runtime import (
    Progress,
    cache_key_on_files,
    markdown_table,
    publish_summary,
    retry_transient_only,
    with_failure_note,
)

DEFAULT_OUTPUT_DIR = "outputs/pdfs"


class PdfFileSummary(BaseModel):
    source: str
    chunks_location: str = Field(description="The file's chunks, one JSON object per line (documents.load_chunks).")
    page_count: int
    elements: int
    chunks: int
    seconds: float
    cached: bool = False
    extractor: str = Field(
        default=documents.UNSTRUCTURED,
        description="What extracted the text: unstructured, or pdfminer when unstructured returned nothing.",
    )


class PdfBatchSummary(BaseModel):
    output_dir: str
    files: list[PdfFileSummary]
    outputs: dict[str, str] = Field(description="Source location -> its chunks file.")
    total_chunks: int
    total_pages: int
    failures: dict[str, str] = Field(default_factory=dict, description="Source location -> why it failed.")


# The worker pool of each running flow, by flow run id: tasks run in threads of the flow's process
# and share it. Not a task parameter, so it never enters a cache key.
_pools: dict[str, documents.PdfWorkerPool] = {}
_pools_lock = threading.Lock()


def _names(key: str, location: str) -> bool:
    """Whether a key of ``password_secrets`` names ``location``: its file name, or the location itself."""
    return key == storage.basename(location) or storage.resolve(key) == location


def password_blocks(
    locations: Sequence[str], password_secret: str | None, password_secrets: Mapping[str, str] | None
) -> dict[str, str]:
    """Location -> the Secret block holding its password; a key of ``password_secrets`` naming no input is an error."""
    by_key = dict(password_secrets or {})
    used: set[str] = set()
    blocks: dict[str, str] = {}
    for location in locations:
        key = next((k for k in by_key if _names(k, location)), None)
        if key is not None:
            used.add(key)
            blocks[location] = by_key[key]
        elif password_secret:
            blocks[location] = password_secret
    unknown = [key for key in by_key if key not in used]
    if unknown:
        raise ParameterError(
            "password_secrets", f"names no input file: {', '.join(unknown)}", "use a file name or location from inputs"
        )
    return blocks


def load_password(block_name: str) -> str:
    """The password held in the Prefect Secret block ``block_name``; never logged or returned to Prefect."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as exc:
        raise ParameterError(
            f"Secret block {block_name!r}",
            "not found",
            "create a Secret block of that name holding the password, or fix the name",
        ) from exc
    if not isinstance(value, str) or not value:
        raise ParameterError(f"Secret block {block_name!r}", "does not hold a password (a non-empty string)")
    return value


def _flow_run_id() -> str:
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    if flow_run is None:  # inside a task: the task run knows its flow run
        return str(context.task_run.flow_run_id)
    return str(flow_run.id)


@task(
    name="process-pdf",
    task_run_name="process-pdf {output_name}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient_only,
    cache_key_fn=cache_key_on_files("location"),
    cache_expiration=timedelta(days=30),
)
def process_pdf_file(
    location: str,
    output_name: str,
    output_dir: str,
    max_characters: int,
    overlap: int,
    password_block: str | None = None,
) -> PdfFileSummary:
    """Check, partition and chunk one PDF in a worker process, then save its chunks atomically.

    ``password_block`` names the Secret block holding the file's password: the password itself is
    read here, so it is never a task parameter, a cache key input or a result.
    """
    password = load_password(password_block) if password_block else None
    with _pools_lock:
        pool = _pools.get(_flow_run_id())
    if pool is None:
        result = documents.process_pdf(location, max_characters=max_characters, overlap=overlap, password=password)
    else:
        result = pool.process(location, max_characters=max_characters, overlap=overlap, password=password)
    try:
        chunks_location = documents.save_result(result, output_dir, name=output_name)
    except StorageFullError:
        _drop_half_result(output_dir, output_name)
        raise
    return PdfFileSummary(
        source=location,
        chunks_location=chunks_location,
        page_count=result.page_count,
        elements=len(result.elements),
        chunks=len(result.chunks),
        seconds=round(result.seconds, 3),
        extractor=result.extractor,
    )


def _drop_half_result(output_dir: str, name: str) -> None:
    """Elements are saved before chunks: without a chunks file beside them they are half a result."""
    chunks = storage.join(output_dir, name + documents.CHUNKS_SUFFIX)
    elements = storage.join(output_dir, name + documents.ELEMENTS_SUFFIX)
    if not storage.exists(chunks) and storage.exists(elements):
        fs, path = storage.filesystem(elements)
        fs.rm(path)


def _report(summary: PdfBatchSummary) -> str:
    # Short cells only: the UI's table does not wrap, so long paths push columns off the page.
    rows = [
        (storage.basename(f.source), f.page_count, f.elements, f.chunks, f.extractor, f"{f.seconds:.2f}",
         "yes" if f.cached else "no")
        for f in summary.files
    ]
    fallbacks = sum(f.extractor != documents.UNSTRUCTURED for f in summary.files)
    sources = sorted({storage.relative(f.source.rsplit("/", 1)[0]) for f in summary.files}) or ["-"]
    text = (
        f"{len(summary.files)} of {len(summary.files) + len(summary.failures)} PDFs processed: "
        f"{summary.total_pages} pages, {summary.total_chunks} chunks.\n\n"
        f"- read from: {', '.join(f'`{s}`' for s in sources)}\n"
        f"- chunks saved as `{storage.relative(summary.output_dir)}/NAME.chunks.jsonl`\n"
        f"- text extracted by pdfminer's layout analysis because unstructured returned no elements: {fallbacks} of "
        f"{len(summary.files)} files\n\n"
        + markdown_table(["file", "pages", "elements", "chunks", "extractor", "seconds", "from cache"], rows)
    )
    if summary.failures:
        text += "\n\n## Failed\n\n" + markdown_table(
            ["file", "reason"], [(storage.relative(k), v) for k, v in summary.failures.items()]
        )
    return text


def _summarise(
    output_dir: str, locations: Sequence[str], files: dict[str, PdfFileSummary], failures: dict[str, str]
) -> PdfBatchSummary:
    ordered = [files[location] for location in locations if location in files]
    return PdfBatchSummary(
        output_dir=output_dir,
        files=ordered,
        outputs={f.source: f.chunks_location for f in ordered},
        total_chunks=sum(f.chunks for f in ordered),
        total_pages=sum(f.page_count for f in ordered),
        failures={location: failures[location] for location in locations if location in failures},
    )


@flow(name="process-pdfs", log_prints=True, **with_failure_note(heartbeat_hooks()))
def process_pdfs(
    inputs: list[str] | str,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    max_characters: Annotated[int, Field(ge=50, le=100_000)] = 1000,
    overlap: Annotated[int, Field(ge=0)] = 0,
    workers: Annotated[int, Field(ge=0, le=64)] = 0,
    password_secret: OptionalText = "",
    password_secrets: OptionalNames = {},  # noqa: B006 - never mutated; {} renders as an empty object
) -> PdfBatchSummary:
    """Partition PDFs into title-based chunks; good files are saved even when others fail.

    Args:
        inputs: Required. PDF paths or URLs, a directory (its .pdf files) or a glob; one location
            as text, or a list. Relative paths are under the data dir; samples:pdfs is three
            PDFs shipped with taskserver.
        output_dir: Where each file's NAME.chunks.jsonl and NAME.elements.jsonl go. Relative
            paths are under the data dir.
        max_characters: Largest chunk, in characters, 50 to 100000.
        overlap: Characters repeated from the end of a split chunk, 0 or more.
        workers: Worker processes, 0 to 64. 0: the configured default (one per core).
        password_secret: Name of a Prefect Secret block holding the password of the encrypted
            inputs. Never a password itself. Empty: no password.
        password_secrets: For each input file name or location, the name of the Secret block
            holding its password, e.g. {"board.pdf": "board-password"}; overrides
            password_secret for that file. Empty: none.
    """
    logger = get_run_logger()
    locations = documents.expand_inputs(inputs)
    blocks = password_blocks(locations, password_secret, password_secrets)
    for block_name in set(blocks.values()):  # a misnamed block fails the run before any work
        load_password(block_name)
    output_dir = storage.makedirs(output_dir)
    names = documents.output_names(locations)
    progress = Progress(len(locations), "PDFs")
    run_id = _flow_run_id()
    pool = documents.PdfWorkerPool(workers)  # processes start on demand; long files split across them
    with _pools_lock:
        _pools[run_id] = pool
    files: dict[str, PdfFileSummary] = {}
    failures: dict[str, str] = {}
    try:
        futures = {
            process_pdf_file.submit(
                location, names[location], output_dir, max_characters, overlap, blocks.get(location)
            ): location
            for location in locations
        }
        for future in as_completed(list(futures)):
            location = futures[future]
            try:
                summary = future.result()
                if not storage.exists(summary.chunks_location):  # cached, but the output was removed since
                    logger.info("%s: cached result's output is missing, processing again", location)
                    summary = process_pdf_file.with_options(refresh_cache=True)(
                        location, names[location], output_dir, max_characters, overlap, blocks.get(location)
                    )
                else:
                    summary.cached = future.state.name == "Cached"  # final once result() returned
                files[location] = summary
                if summary.extractor != documents.UNSTRUCTURED:
                    logger.warning("%s: unstructured returned no elements; text extracted by %s", location, summary.extractor)
                progress.advance(note=f"{location}: {summary.chunks} chunks")
            except DocumentError as exc:
                failures[location] = exc.reason
                progress.advance(note=f"{location}: FAILED {exc.reason}")
            except Exception as exc:  # noqa: BLE001 - reported per file; the batch goes on
                failures[location] = f"{type(exc).__name__}: {exc}"
                progress.advance(note=f"{location}: FAILED {exc}")
    finally:
        with _pools_lock:
            _pools.pop(run_id, None)
        pool.close()

    summary = _summarise(output_dir, locations, files, failures)
    publish_summary("process-pdfs", "Processed PDFs", _report(summary))
    if summary.failures:
        raise BatchFailedError.from_failures(summary.failures, len(locations), partial=summary)
    return summary
