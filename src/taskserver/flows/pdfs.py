"""The ``process-pdfs`` flow: PDFs to chunks on shared storage, one task per file.

The CPU work runs in forked worker processes (taskserver.documents.PdfWorkerPool); Prefect tasks
give each file its own state, retries on transient errors and a cache keyed on the file's bytes.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.context import get_run_context
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from taskserver import documents, storage
from taskserver.errors import BatchFailedError, DocumentError, StorageFullError
from taskserver.flows.runtime import (
    Progress,
    cache_key_on_files,
    markdown_table,
    publish_summary,
    retry_transient_only,
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
    location: str, output_name: str, output_dir: str, max_characters: int, overlap: int
) -> PdfFileSummary:
    """Check, partition and chunk one PDF in a worker process, then save its chunks atomically."""
    with _pools_lock:
        pool = _pools.get(_flow_run_id())
    if pool is None:
        result = documents.process_pdf(location, max_characters=max_characters, overlap=overlap)
    else:
        result = pool.process(location, max_characters=max_characters, overlap=overlap)
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
    )


def _drop_half_result(output_dir: str, name: str) -> None:
    """Elements are saved before chunks: without a chunks file beside them they are half a result."""
    chunks = storage.join(output_dir, name + documents.CHUNKS_SUFFIX)
    elements = storage.join(output_dir, name + documents.ELEMENTS_SUFFIX)
    if not storage.exists(chunks) and storage.exists(elements):
        fs, path = storage.filesystem(elements)
        fs.rm(path)


def _report(summary: PdfBatchSummary) -> str:
    rows = [
        (f.source, f.page_count, f.elements, f.chunks, f"{f.seconds:.2f}", "cached" if f.cached else "", f.chunks_location)
        for f in summary.files
    ]
    text = (
        f"{len(summary.files)} of {len(summary.files) + len(summary.failures)} PDFs processed: "
        f"{summary.total_pages} pages, {summary.total_chunks} chunks, saved under `{summary.output_dir}`.\n\n"
        + markdown_table(["file", "pages", "elements", "chunks", "seconds", "", "chunks file"], rows)
    )
    if summary.failures:
        text += "\n\n## Failed\n\n" + markdown_table(["file", "reason"], summary.failures.items())
    return text


@flow(name="process-pdfs", log_prints=True)
def process_pdfs(
    inputs: list[str] | str,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    max_characters: Annotated[int, Field(ge=50, le=100_000)] = 1000,
    overlap: Annotated[int, Field(ge=0)] = 0,
    workers: Annotated[int, Field(ge=0, le=64)] = 0,
) -> PdfBatchSummary:
    """Partition PDFs into title-based chunks; good files are saved even when others fail.

    Args:
        inputs: PDF paths or URLs, a directory (its *.pdf files) or a glob. Relative paths are
            under the data dir.
        output_dir: Where <name>.chunks.jsonl and <name>.elements.jsonl go. Relative paths are
            under the data dir.
        max_characters: Largest chunk, in characters.
        overlap: Characters repeated from the end of a split chunk.
        workers: Worker processes; 0 means the configured default (one per core).
    """
    logger = get_run_logger()
    locations = documents.expand_inputs(inputs)
    output_dir = storage.makedirs(output_dir)
    names = documents.output_names(locations)
    progress = Progress(len(locations), "process-pdfs")
    run_id = _flow_run_id()
    pool = documents.PdfWorkerPool(workers)  # processes start on demand; long files split across them
    with _pools_lock:
        _pools[run_id] = pool
    files: dict[str, PdfFileSummary] = {}
    failures: dict[str, str] = {}
    try:
        futures = {
            process_pdf_file.submit(location, names[location], output_dir, max_characters, overlap): location
            for location in locations
        }
        for future in as_completed(list(futures)):
            location = futures[future]
            try:
                summary = future.result()
                if not storage.exists(summary.chunks_location):  # cached, but the output was removed since
                    logger.info("%s: cached result's output is missing, processing again", location)
                    summary = process_pdf_file.with_options(refresh_cache=True)(
                        location, names[location], output_dir, max_characters, overlap
                    )
                else:
                    summary.cached = future.state.name == "Cached"  # final once result() returned
                files[location] = summary
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

    ordered = [files[location] for location in locations if location in files]
    summary = PdfBatchSummary(
        output_dir=output_dir,
        files=ordered,
        outputs={f.source: f.chunks_location for f in ordered},
        total_chunks=sum(f.chunks for f in ordered),
        total_pages=sum(f.page_count for f in ordered),
        failures={location: failures[location] for location in locations if location in failures},
    )
    publish_summary("process-pdfs", "Processed PDFs", _report(summary))
    if summary.failures:
        raise BatchFailedError.from_failures(summary.failures, len(locations), partial=summary)
    return summary
