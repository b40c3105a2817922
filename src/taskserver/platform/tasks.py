"""The task catalogue: each task type's flow, entrypoint, pools and lanes.

Deployments are named ``<flow>/<priority>`` (the task's default lane) and, for warm-capable
tasks, ``<flow>/<priority>-<other lane>``; this catalogue and the priority model are the two
inputs every generated deployment comes from.

The catalogue is what is installed: every package registers its task types under the entry
point group ``taskserver.tasks`` (``TASK_ENTRY_POINTS``), taskserver's own six included
(``BUILTIN_TASKS``, registered in its pyproject.toml). ``TASKS``, ``get_task`` and
``task_names`` read the catalogue; ``catalogue()`` also says which package registered each
task and what was wrong with the registrations it refused (``taskserver bootstrap`` refuses
to start with any: ``platform.registration``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

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
CONTAINER_WORKER_TYPE = "taskserver-container"
"""The worker type of the local stack's job-lane pools under ``taskserver up --containers``: each
run in a container of the CPU image, through Docker's API (taskserver.platform.containers)."""


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


def is_module_entrypoint(entrypoint: str) -> bool:
    """``package.module.flow_function`` (an installed package) rather than ``path/file.py:function``."""
    return ":" not in entrypoint


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
    request_handler: str = ""
    """``package.module:NAME`` of a ``request_lane.catalogue.RequestHandler``: the task also serves
    small requests on the request lane, many per library call. Empty: flow runs only."""

    def pool_for(self, lane: str) -> Pool:
        return WARM_POOL if lane == WARM_LANE else self.pool

    @property
    def module(self) -> str:
        """The module that defines the flow: ``pkg.mod`` of ``pkg.mod.function``, or the module of
        a ``src/`` file entrypoint (``src/taskserver/flows/encode.py:encode``: ``taskserver.flows.encode``)."""
        if is_module_entrypoint(self.entrypoint):
            return self.entrypoint.rpartition(".")[0]
        path = self.entrypoint.partition(":")[0].removesuffix(".py").removeprefix("src/")
        return path.replace("/", ".")

    @property
    def lanes(self) -> tuple[str, ...]:
        """The task's lanes, default first."""
        if not self.warm_capable:
            return (JOB_LANE,)
        return (self.default_lane, *(lane for lane in LANES if lane != self.default_lane))


_BUILTIN_REQUESTS = "taskserver.platform.request_lane.builtin"
"""Where taskserver's own request handlers live (named, not imported: they load torch)."""

BUILTIN_TASKS: tuple[TaskType, ...] = (
    TaskType("encode", "src/taskserver/flows/encode.py:encode", CPU_POOL,
             "Texts to embeddings with all-MiniLM-L6-v2.", WARM_LANE, warm_capable=True,
             data_parameters=("texts", "input_path"), deployment_parameters=(("input_path", SAMPLE_TEXTS),),
             request_handler=f"{_BUILTIN_REQUESTS}:ENCODE"),
    TaskType("process-pdfs", "src/taskserver/flows/pdfs.py:process_pdfs", CPU_POOL,
             "PDFs to clean text elements and chunks.", WARM_LANE, warm_capable=True,
             data_parameters=("inputs",)),
    TaskType("cluster", "src/taskserver/flows/cluster.py:cluster", CPU_POOL,
             "k-means clusters and a nearest-neighbour index over embeddings."),
    TaskType("train", "src/taskserver/flows/train.py:train", GPU_POOL,
             "Fine-tune a text classifier with accelerate."),
    TaskType("infer", "src/taskserver/flows/infer.py:infer", GPU_POOL,
             "Batch classification with a trained model.", WARM_LANE, warm_capable=True,
             data_parameters=("texts", "input_path"), deployment_parameters=(("input_path", SAMPLE_TEXTS),),
             request_handler=f"{_BUILTIN_REQUESTS}:INFER"),
    TaskType("ingest-documents", "src/taskserver/flows/ingest.py:ingest_documents", CPU_POOL,
             "Pipeline: PDFs to chunks to embeddings to clusters and a search index.",
             steps=("process-pdfs", "encode", "cluster")),
)

PROBE_TASK = TaskType(
    "probe", "src/taskserver/flows/probe.py:probe", CPU_POOL,
    "Diagnostic: records when its body starts, then sleeps. Used by tests and benchmarks.",
    JOB_LANE, warm_capable=True,
)
DIAGNOSTIC_TASKS: tuple[TaskType, ...] = (PROBE_TASK,)
"""Deployed only on request (`taskserver bootstrap --with-probe`); not part of the catalogue."""


# -- the installed catalogue ------------------------------------------------------------------

TASK_ENTRY_POINTS = "taskserver.tasks"
"""The entry point group a package registers task types in; each entry point names a
``TaskType`` or a sequence of them (``[project.entry-points."taskserver.tasks"]``)."""
OWN_PACKAGE = "taskserver"


@dataclass(frozen=True)
class Catalogue:
    tasks: tuple[TaskType, ...]
    packages: dict[str, str] = field(default_factory=dict)
    """Task name -> the distribution that registered it."""
    problems: tuple[str, ...] = ()
    """Registrations refused, each a sentence naming the package and what is wrong."""

    def package_of(self, name: str) -> str:
        return self.packages.get(name, OWN_PACKAGE)

    @cached_property
    def _index(self) -> dict[str, TaskType]:
        return {task.name: task for task in self.tasks}

    def by_name(self) -> dict[str, TaskType]:
        return self._index


def _package(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return dist.name if dist is not None else entry.value.split(".", 1)[0].split(":", 1)[0]


def _registered(entry: EntryPoint) -> tuple[list[TaskType], str | None]:
    """The task types one entry point names, or why it names none."""
    try:
        value = entry.load()
    except Exception as exc:  # any error of the package's import is its problem, reported by name
        return [], f"its entry point {entry.name} = {entry.value} does not import: {type(exc).__name__}: {exc}"
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    wrong = [v for v in values if not isinstance(v, TaskType)]
    if wrong or not values:
        return [], (f"its entry point {entry.name} = {entry.value} names {type(wrong[0] if wrong else value).__name__},"
                    " not a TaskType or a sequence of them")
    return values, None


def _problem_of(task: TaskType, seen: dict[str, str]) -> str | None:
    """What is wrong with one task type on its own, or beside the ones already registered."""
    pools = {pool.name: pool for pool in POOLS}
    if task.name in seen:
        return f"task {task.name!r} is already registered by {seen[task.name]}"
    if task.pool.name not in pools or pools[task.pool.name] != task.pool:
        return (f"task {task.name!r} names pool {task.pool.name!r}, which is not one of the job-lane pools"
                f" ({', '.join(pools)}); use CPU_POOL or GPU_POOL from taskserver.platform.tasks")
    if task.default_lane not in LANES or (task.default_lane == WARM_LANE and not task.warm_capable):
        return f"task {task.name!r} has default lane {task.default_lane!r}; lanes: {', '.join(LANES)} (warm needs warm_capable)"
    return None


def load_catalogue(entries: Iterable[EntryPoint] | None = None) -> Catalogue:
    """Every task type the installed packages register, taskserver's own first.

    A registration that does not import, names something else than task types, clashes with
    a task already registered (or the diagnostic probe) or names an unknown pool is left out and
    reported in ``problems``. A checkout used without being installed has no entry points: its
    built-in tasks count as registered by taskserver.
    """
    found = list(entry_points(group=TASK_ENTRY_POINTS) if entries is None else entries)
    found.sort(key=lambda e: (_package(e) != OWN_PACKAGE, _package(e), e.name))
    if entries is None and not any(_package(e) == OWN_PACKAGE for e in found):
        found.insert(0, EntryPoint("taskserver", f"{__name__}:BUILTIN_TASKS", TASK_ENTRY_POINTS))
    seen: dict[str, str] = {task.name: "taskserver (a diagnostic task)" for task in DIAGNOSTIC_TASKS}
    tasks: list[TaskType] = []
    packages: dict[str, str] = {}
    problems: list[str] = []
    for entry in found:
        package = _package(entry)
        registered, problem = _registered(entry)
        if problem:
            problems.append(f"package {package!r}: {problem}")
        for task in registered:
            problem = _problem_of(task, seen)
            if problem:
                problems.append(f"package {package!r}: {problem}")
                continue
            seen[task.name] = f"package {package!r}"
            tasks.append(task)
            packages[task.name] = package
    known = {task.name for task in tasks}
    for task in list(tasks):
        missing = [step for step in task.steps if step not in known]
        if missing:
            problems.append(f"package {packages[task.name]!r}: pipeline {task.name!r} runs unknown steps {missing}")
            tasks.remove(task)
    return Catalogue(tuple(tasks), packages, tuple(problems))


@lru_cache(maxsize=1)
def catalogue() -> Catalogue:
    """The installed catalogue, loaded once per process."""
    return load_catalogue()


def __getattr__(name: str) -> Any:
    # ``TASKS`` is the installed catalogue's tasks, loaded on first use: a package's task module
    # imports this module (TaskType, the pools) while its entry point is being loaded.
    if name == "TASKS":
        return catalogue().tasks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_names() -> list[str]:
    return [task.name for task in catalogue().tasks]


def get_task(name: str) -> TaskType:
    found = catalogue().by_name()
    try:
        return found[name]
    except KeyError:
        from taskserver.errors import ParameterError

        raise ParameterError.not_in(f"task {name!r}", "unknown task", found) from None
