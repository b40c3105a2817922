"""The priority model: four levels, each a Prefect work queue and a Kubernetes PriorityClass.

This is the only place the level names and numbers are written down. ``prefect.yaml``,
the bootstrap and the Helm chart are generated from it or checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class PreemptionPolicy(str, Enum):
    PREEMPT_LOWER = "PreemptLowerPriority"
    NEVER = "Never"


@dataclass(frozen=True)
class PriorityLevel:
    name: str
    queue_priority: int
    """Prefect work-queue priority: a lower number is served first."""
    class_value: int
    """Kubernetes PriorityClass value: a higher number is scheduled first."""
    preemption_policy: PreemptionPolicy
    description: str

    @property
    def work_queue(self) -> str:
        return self.name

    @property
    def priority_class_name(self) -> str:
        return f"taskserver-{self.name}"


PRIORITIES: tuple[PriorityLevel, ...] = (
    PriorityLevel(
        "critical", 1, 100_000, PreemptionPolicy.PREEMPT_LOWER,
        "Served first; may preempt running lower-priority pods.",
    ),
    PriorityLevel(
        "high", 2, 10_000, PreemptionPolicy.PREEMPT_LOWER,
        "Interactive work that should not wait behind batch jobs.",
    ),
    PriorityLevel(
        "normal", 3, 1_000, PreemptionPolicy.PREEMPT_LOWER,
        "The default for submitted work.",
    ),
    PriorityLevel(
        "low", 4, 100, PreemptionPolicy.NEVER,
        "Batch and backfill work; never preempts anything.",
    ),
)

DEFAULT_PRIORITY = "normal"

_BY_NAME = {level.name: level for level in PRIORITIES}


def priority_names() -> list[str]:
    return [level.name for level in PRIORITIES]


def get_priority(name: str) -> PriorityLevel:
    try:
        return _BY_NAME[name]
    except KeyError:
        from taskserver.errors import ParameterError

        raise ParameterError.not_in(f"priority {name!r}", "unknown priority", _BY_NAME) from None
