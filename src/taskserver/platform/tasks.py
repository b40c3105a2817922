"""The task catalogue: each task type's flow, entrypoint and work pool.

Deployments are named ``<flow>/<priority>``; this catalogue and the priority model are
the two inputs every generated deployment comes from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pool:
    name: str
    description: str
    gpu: bool = False


CPU_POOL = Pool("cpu", "CPU work: PDFs, encoding, clustering, pipelines.")
GPU_POOL = Pool("gpu", "GPU work: training and batch inference.", gpu=True)
POOLS: tuple[Pool, ...] = (CPU_POOL, GPU_POOL)


@dataclass(frozen=True)
class TaskType:
    name: str
    """The Prefect flow name, and the first half of every deployment name."""
    entrypoint: str
    """``path/to/file.py:function``, relative to the repository root (``src/`` layout)."""
    pool: Pool
    description: str


TASKS: tuple[TaskType, ...] = (
    TaskType("encode", "src/taskserver/flows/encode.py:encode", CPU_POOL,
             "Texts to embeddings with all-MiniLM-L6-v2."),
    TaskType("process-pdfs", "src/taskserver/flows/pdfs.py:process_pdfs", CPU_POOL,
             "PDFs to clean text elements and chunks."),
    TaskType("cluster", "src/taskserver/flows/cluster.py:cluster", CPU_POOL,
             "k-means clusters and a nearest-neighbour index over embeddings."),
    TaskType("train", "src/taskserver/flows/train.py:train", GPU_POOL,
             "Fine-tune a text classifier with accelerate."),
    TaskType("infer", "src/taskserver/flows/infer.py:infer", GPU_POOL,
             "Batch classification with a trained model."),
    TaskType("ingest-documents", "src/taskserver/flows/ingest.py:ingest_documents", CPU_POOL,
             "Pipeline: PDFs to chunks to embeddings to clusters and a search index."),
)

_BY_NAME = {task.name: task for task in TASKS}


def task_names() -> list[str]:
    return [task.name for task in TASKS]


def get_task(name: str) -> TaskType:
    try:
        return _BY_NAME[name]
    except KeyError:
        from taskserver.errors import ParameterError

        raise ParameterError.not_in(f"task {name!r}", "unknown task", _BY_NAME) from None


PROBE_TASK = TaskType(
    "probe", "src/taskserver/flows/probe.py:probe", CPU_POOL,
    "Diagnostic: records when its body starts, then sleeps. Used by tests and benchmarks.",
)
DIAGNOSTIC_TASKS: tuple[TaskType, ...] = (PROBE_TASK,)
"""Deployed only on request (`taskserver bootstrap --with-probe`); not part of the catalogue."""
