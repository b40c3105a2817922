"""The GPU catalogue: each GPU type a user can name, and how Kubernetes finds its nodes.

A user asks for ``a100``; the node label, the taints to tolerate, the resource name and the
autoscaler hints all come from the entry here. Job templates, the Helm chart's Karpenter
NodePools and the docs are generated from this module, never written out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource the NVIDIA device plugin advertises."""

GPU_TYPE_LABEL = "taskserver.io/gpu-type"
"""The node label every GPU node carries, whose value is the catalogue name (``a100``)."""


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str = "NoSchedule"

    def toleration(self) -> dict[str, str]:
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}

    def as_node_taint(self) -> dict[str, str]:
        return {"key": self.key, "value": self.value, "effect": self.effect}


GPU_TAINT = Taint(GPU_RESOURCE, "true", "NoSchedule")
"""GPU nodes are tainted so that CPU work never lands on them and keeps them from scaling down."""


@dataclass(frozen=True)
class GPUType:
    name: str
    """What a user writes: ``l4``, ``a100``."""
    memory_gib: int
    description: str
    karpenter_gpu_name: str
    """The value of Karpenter's ``karpenter.k8s.aws/instance-gpu-name`` for this GPU."""
    gke_accelerator: str | None = None
    """The value of GKE's ``cloud.google.com/gke-accelerator`` label, where GKE offers it."""
    taints: tuple[Taint, ...] = field(default=(GPU_TAINT,))

    @property
    def node_labels(self) -> dict[str, str]:
        return {GPU_TYPE_LABEL: self.name}

    def node_selector(self) -> dict[str, str]:
        return dict(self.node_labels)

    def tolerations(self) -> list[dict[str, str]]:
        return [taint.toleration() for taint in self.taints]

    def as_dict(self) -> dict[str, Any]:
        """The entry as the Helm chart reads it (``files/platform.json``)."""
        return {
            "name": self.name,
            "memoryGiB": self.memory_gib,
            "description": self.description,
            "karpenterGpuName": self.karpenter_gpu_name,
            "gkeAccelerator": self.gke_accelerator,
            "nodeLabels": self.node_labels,
            "taints": [taint.as_node_taint() for taint in self.taints],
        }


GPUS: tuple[GPUType, ...] = (
    GPUType("l4", 24, "NVIDIA L4: inference and small fine-tunes.", "l4", "nvidia-l4"),
    GPUType("a10g", 24, "NVIDIA A10G (AWS g5): inference and small fine-tunes.", "a10g"),
    GPUType("a100", 80, "NVIDIA A100 80GB: training.", "a100", "nvidia-a100-80gb"),
    GPUType("h100", 80, "NVIDIA H100 80GB: large training runs.", "h100", "nvidia-h100-80gb"),
)

DEFAULT_GPU = "l4"

_BY_NAME = {gpu.name: gpu for gpu in GPUS}


def gpu_names() -> list[str]:
    return [gpu.name for gpu in GPUS]


def get_gpu(name: str) -> GPUType:
    try:
        return _BY_NAME[name]
    except KeyError:
        from taskserver.errors import ParameterError

        raise ParameterError.not_in(f"gpu type {name!r}", "not in the GPU catalogue", _BY_NAME) from None


def all_gpu_tolerations() -> list[dict[str, str]]:
    """Tolerations for every taint any catalogue GPU carries, each once.

    GPU jobs tolerate all of them and pick the node by label, so changing ``gpu_type``
    alone is enough to move a job to another GPU.
    """
    seen: dict[tuple[str, str, str], dict[str, str]] = {}
    for gpu in GPUS:
        for taint in gpu.taints:
            seen.setdefault((taint.key, taint.value, taint.effect), taint.toleration())
    return list(seen.values())
