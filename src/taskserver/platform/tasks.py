"""The task catalogue: each task type's flow, entrypoint, pools and lanes.

Deployments are named ``<flow>/<priority>`` (the task's default lane) and, for warm-capable
tasks, ``<flow>/<priority>-<other lane>``; this catalogue and the priority model are the two
inputs every generated deployment comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskserver.samples import SAMPLE_TEXTS


JOB_LANE = "job"
"""Each run in its own process (locally) or Kubernetes Job: isolated, for heavy and GPU work."""
WARM_LANE = "warm"
"""Runs execute in interpreters that stay warm: sub-second starts for small requests."""
LANES = (JOB_LANE, WARM_LANE)
LANE_DESCRIPTIONS = {
    JOB_LANE: "each run gets its own process (locally) or Kubernetes Job, for large inputs and heavy work",
    WARM_LANE: "runs start in about half a second in an interpreter that keeps the model loaded, for small inputs",
}
"""What a lane means, in a person's words: the deployments' descriptions say it."""

PROCESS_WORKER_TYPE = "taskserver-process"
"""The Prefect worker type of the local stack's job-lane pools (taskserver.platform.worker)."""
WARM_WORKER_TYPE = "taskserver-warm"
"""The Prefect worker type that serves the warm lane (taskserver.platform.warm)."""


@dataclass(frozen=True)
class Pool:
    name: str
    description: str
    gpu: bool = False
    lane: str = JOB_LANE
    worker_type: str | None = None
    """A fixed worker type; ``None`` means the platform's job runner (process locally,
    ``kubernetes`` in a cluster)."""


CPU_POOL = Pool("cpu", "CPU work: PDFs, encoding, clustering, pipelines.")
GPU_POOL = Pool("gpu", "GPU work: training and batch inference.", gpu=True)
POOLS: tuple[Pool, ...] = (CPU_POOL, GPU_POOL)
"""The job-lane pools: one isolated process or Kubernetes Job per run."""
WARM_POOL = Pool(
    "warm",
    "Warm lane: small encode, infer and PDF runs in interpreters that stay loaded.",
    lane=WARM_LANE,
    worker_type=WARM_WORKER_TYPE,
)
ALL_POOLS: tuple[Pool, ...] = (*POOLS, WARM_POOL)


@dataclass(frozen=True)
class TaskType:
    name: str
    """The Prefect flow name, and the first half of every deployment name."""
    entrypoint: str
    """``path/to/file.py:function``, relative to the repository root (``src/`` layout)."""
    pool: Pool
    """The job-lane pool."""
    description: str
    default_lane: str = JOB_LANE
    """Where ``<flow>/<priority>`` runs. A warm-capable task also gets ``<flow>/<priority>-<other
    lane>``, so a submitter can always pick the other lane."""
    warm_capable: bool = False
    data_parameters: tuple[str, ...] = ()
    """The parameters that carry the input data (inline, or paths to it): their size decides
    whether a run is small enough for the warm lane. Models and outputs do not count."""
    deployment_parameters: tuple[tuple[str, str], ...] = ()
    """Defaults the task's deployments fill in (Quick run uses them, the custom-run form starts
    with them): a shipped sample input where the flow takes texts or a file."""
    steps: tuple[str, ...] = ()
    """For a pipeline: the tasks it may run as their own deployment runs. Each of its
    deployments tells its runs where those are (``Settings.step_deployments``)."""

    def pool_for(self, lane: str) -> Pool:
        return WARM_POOL if lane == WARM_LANE else self.pool

    @property
    def lanes(self) -> tuple[str, ...]:
        """The task's lanes, default first."""
        if not self.warm_capable:
            return (JOB_LANE,)
        return (self.default_lane, *(lane for lane in LANES if lane != self.default_lane))


TASKS: tuple[TaskType, ...] = (
    TaskType("encode", "src/taskserver/flows/encode.py:encode", CPU_POOL,
             "Texts to embeddings with all-MiniLM-L6-v2.", WARM_LANE, warm_capable=True,
             data_parameters=("texts", "input_path"), deployment_parameters=(("input_path", SAMPLE_TEXTS),)),
    TaskType("process-pdfs", "src/taskserver/flows/pdfs.py:process_pdfs", CPU_POOL,
             "PDFs to clean text elements and chunks.", WARM_LANE, warm_capable=True,
             data_parameters=("inputs",)),
    TaskType("cluster", "src/taskserver/flows/cluster.py:cluster", CPU_POOL,
             "k-means clusters and a nearest-neighbour index over embeddings."),
    TaskType("train", "src/taskserver/flows/train.py:train", GPU_POOL,
             "Fine-tune a text classifier with accelerate."),
    TaskType("infer", "src/taskserver/flows/infer.py:infer", GPU_POOL,
             "Batch classification with a trained model.", WARM_LANE, warm_capable=True,
             data_parameters=("texts", "input_path"), deployment_parameters=(("input_path", SAMPLE_TEXTS),)),
    TaskType("ingest-documents", "src/taskserver/flows/ingest.py:ingest_documents", CPU_POOL,
             "Pipeline: PDFs to chunks to embeddings to clusters and a search index.",
             steps=("process-pdfs", "encode", "cluster")),
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
    JOB_LANE, warm_capable=True,
)
DIAGNOSTIC_TASKS: tuple[TaskType, ...] = (PROBE_TASK,)
"""Deployed only on request (`taskserver bootstrap --with-probe`); not part of the catalogue."""
