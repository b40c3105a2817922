"""The ``ingest-documents`` pipeline: PDFs to chunks to embeddings to clusters and a search index.

Each step is its own flow, run here as a subflow, so every step has its own state, logs and
artifacts in the UI. Steps hand over through files in the output directory, never memory, so
they can run in different processes or pods against the shared data location.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.states import State
from pydantic import BaseModel, Field

from taskserver import documents, storage
from taskserver.errors import BatchFailedError, DocumentError, ParameterError
from taskserver.flows.cluster import cluster
from taskserver.flows.encode import encode
from taskserver.flows.pdfs import PdfBatchSummary, process_pdfs
from taskserver.flows.forms import OptionalCount, OptionalNames, OptionalText
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver.flows.runtime import cluster_sizes_chart, markdown_table, publish_summary, run_link, with_failure_note
from taskserver.search import Collection
from taskserver.settings import get_settings

DEFAULT_OUTPUT_DIR = "outputs/ingest"


class IngestSummary(BaseModel):
    output_dir: str = Field(description="Holds chunks.jsonl, embeddings.npz and clusters/ (with the index).")
    documents: int
    chunks: int
    clusters: int
    inertia: float
    cluster_sizes: list[int]
    failures: dict[str, str] = Field(default_factory=dict, description="Input -> why it failed.")
    seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per step.")


def default_cluster_count(chunks: int) -> int:
    """A rule of thumb, sqrt(n/2), kept between 1 and n."""
    return max(1, min(chunks, round(math.sqrt(chunks / 2))))


def _step_deployment(step: str) -> str:
    """The deployment a step runs as: the pipeline's own deployment says (at its own priority,
    on the job lane), through ``Settings.step_deployments``."""
    name = get_settings().step_deployments.get(step)
    if name is None:
        raise ParameterError(
            "steps_as_runs", f"this run does not know which deployment runs its {step} step",
            "run the pipeline through one of its deployments (ingest-documents/<priority>), which say,"
            " or with steps_as_runs=false",
        )
    return name


def _run_step(step, parameters: dict, as_run: bool, runs: dict[str, str]) -> State:
    """Run one step here (a subflow), or as its own deployment run (its own process or pod).

    ``runs`` records each step's flow run id, for the summary's links to the steps' pages.
    """
    if not as_run:
        state = step(**parameters, return_state=True)
    else:
        state = run_deployment(_step_deployment(step.name), parameters=parameters, as_subflow=True).state
    if state.state_details.flow_run_id is not None:
        runs[step.name] = str(state.state_details.flow_run_id)
    return state


def _completed(state: State, step: str):
    """A step's result; a failed step raises its own error, naming the input."""
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        raise error
    raise DocumentError(step, f"the {step} step ended {state.type.value}: {state.message}")


def _pdf_step(parameters: dict, as_run: bool, runs: dict[str, str]) -> PdfBatchSummary:
    """The process-pdfs step; ``parameters`` are its own (Secret block names, never passwords)."""
    state = _run_step(process_pdfs, parameters, as_run, runs)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, BatchFailedError) and isinstance(error.partial, PdfBatchSummary):
            return error.partial  # the good files, with the failures listed
    return _completed(state, "process-pdfs")


def _write_chunk_catalogue(summary: PdfBatchSummary, location: str) -> int:
    """One JSON line per chunk (id, text, source, pages, types), the encode step's input."""
    rows = []
    for file in summary.files:
        for chunk in documents.load_chunks(file.chunks_location):
            rows.append(
                {
                    "id": chunk.chunk_id,
                    "text": chunk.text,
                    "source": chunk.source,
                    "pages": chunk.pages,
                    "element_types": chunk.element_types,
                }
            )
    storage.write_text(location, "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


@flow(name="ingest-documents", description="PDFs to chunks to embeddings to clusters and a search index.",
      **with_failure_note(heartbeat_hooks()))
def ingest_documents(
    inputs: list[str] | str,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    max_characters: Annotated[int, Field(ge=50, le=100_000)] = 1000,
    clusters: OptionalCount = 0,
    seed: Annotated[int, Field(ge=0)] = 0,
    workers: Annotated[int, Field(ge=0, le=64)] = 0,
    steps_as_runs: bool = False,
    password_secret: OptionalText = "",
    password_secrets: OptionalNames = {},  # noqa: B006 - never mutated; {} renders as an empty object
) -> IngestSummary:
    """Build a searchable, clustered collection from PDFs; bad files are reported, good ones kept.

    Args:
        inputs: Required. PDF paths or URLs, a directory of PDFs, or a glob; one location as text,
            or a list. Relative paths are under the data dir; samples:pdfs is three PDFs shipped
            with taskserver.
        output_dir: Where the collection (chunks.jsonl, embeddings.npz, clusters/) is written.
            Relative paths are under the data dir.
        max_characters: Largest chunk, in characters, 50 to 100000.
        clusters: Number of k-means clusters, 0 or more. 0: the square root of half the chunk count.
        seed: Seed for k-means, 0 or more: the same seed gives the same clusters.
        workers: PDF worker processes, 0 to 64. 0: one per CPU core.
        steps_as_runs: Run each step as its own deployment run at this run's priority (on
            Kubernetes: its own pod, with its pool's resources) instead of in this run's process.
            Steps hand over only through files in the data location.
        password_secret: Name of a Prefect Secret block holding the password of the encrypted
            inputs. Never a password itself. Empty: no password.
        password_secrets: For each input file name or location, the name of the Secret block
            holding its password, e.g. {"board.pdf": "board-password"}; overrides
            password_secret for that file. Empty: none.
    """
    # Long on purpose: the three steps and their hand-over (files in the collection) read top to
    # bottom; each step's own work is in _pdf_step / _run_step and the flows it runs.
    logger = get_run_logger()
    collection = Collection(storage.makedirs(output_dir))
    seconds: dict[str, float] = {}
    runs: dict[str, str] = {}

    started = time.perf_counter()
    pdf_parameters = {
        "inputs": inputs, "output_dir": storage.join(collection.location, "pdfs"), "max_characters": max_characters,
        "workers": workers, "password_secret": password_secret, "password_secrets": password_secrets,
    }
    pdfs = _pdf_step(pdf_parameters, steps_as_runs, runs)
    count = _write_chunk_catalogue(pdfs, collection.chunks_location)
    seconds["pdfs"] = round(time.perf_counter() - started, 3)
    if count == 0:
        raise BatchFailedError.from_failures(pdfs.failures or {str(inputs): "no chunks extracted"}, max(len(pdfs.failures), 1))
    logger.info("%d chunks from %d documents", count, len(pdfs.files))

    started = time.perf_counter()
    encoded = _run_step(
        encode,
        {"input_path": collection.chunks_location, "output": collection.embeddings_location, "normalize": True},
        steps_as_runs, runs,
    )
    _completed(encoded, "encode")
    seconds["encode"] = round(time.perf_counter() - started, 3)

    started = time.perf_counter()
    k = min(clusters or default_cluster_count(count), count)
    clustered = _completed(
        _run_step(
            cluster,
            {"embeddings": collection.embeddings_location, "k": k, "seed": seed,
             "output_dir": collection.clusters_location},
            steps_as_runs, runs,
        ),
        "cluster",
    )
    seconds["cluster"] = round(time.perf_counter() - started, 3)

    summary = IngestSummary(
        output_dir=collection.location,
        documents=len(pdfs.files),
        chunks=count,
        clusters=k,
        inertia=float(clustered["inertia"]),
        cluster_sizes=[int(size) for size in clustered["sizes"]],
        failures=pdfs.failures,
        seconds=seconds,
    )
    _publish(summary, runs)
    if summary.failures:
        raise BatchFailedError.from_failures(
            summary.failures, len(summary.failures) + summary.documents, partial=summary
        )
    return summary


_STEP_OF_TIMING = {"pdfs": process_pdfs.name, "encode": encode.name, "cluster": cluster.name}


def _publish(summary: IngestSummary, runs: dict[str, str]) -> None:
    """The pipeline's summary: what came out, and a link to each step's run (its own artifacts)."""
    steps = [
        (run_link(runs[_STEP_OF_TIMING[step]], _STEP_OF_TIMING[step]) if _STEP_OF_TIMING[step] in runs
         else _STEP_OF_TIMING[step], seconds)
        for step, seconds in summary.seconds.items()
    ]
    text = (
        f"{summary.documents} documents → {summary.chunks} chunks → {summary.clusters} clusters "
        f"(inertia {summary.inertia:.3f}), written to `{storage.relative(summary.output_dir)}`.\n\n"
        "## Steps\n\nEach step's page has its own artifacts (files, embeddings, clusters).\n\n"
        + markdown_table(["step", "seconds"], steps)
        + "\n\n## Cluster sizes\n\n" + cluster_sizes_chart(summary.cluster_sizes)
    )
    if summary.failures:
        text += "\n\n## Failed inputs\n\n" + markdown_table(
            ["input", "reason"], [(storage.relative(k), v) for k, v in summary.failures.items()]
        )
    publish_summary("ingest-documents", "Ingested documents", text)
