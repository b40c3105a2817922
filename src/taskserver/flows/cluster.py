"""The ``cluster`` flow: an embeddings file to k-means clusters and a nearest-neighbour index.

A thin wrapper over ``taskserver.clustering``. Writes ``assignments.csv``, ``centroids.npy``,
``summary.json`` and ``index/`` to a directory named after the input and the options.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import Field

from taskserver import clustering, encoding, storage
from taskserver.clustering import KMeansResult, NeighbourIndex
from taskserver.encoding import Embeddings
from taskserver.flows.forms import OptionalText
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver.flows.runtime import (
    cluster_sizes_chart,
    file_fingerprint,
    markdown_table,
    publish_summary,
    retry_transient_only,
    with_failure_note,
)

IndexKind = Literal["auto", "flat", "ivf", "none"]


@task(
    name="load-embeddings",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def load_input(embeddings: str) -> Embeddings:
    return encoding.load_embeddings(embeddings)


@task(name="train-kmeans", cache_policy=NO_CACHE, persist_result=False)
def train_kmeans(
    data: Embeddings, k: int, niter: int, seed: int, sample_all: bool, init: str, nredo: int, name: str
) -> KMeansResult:
    return clustering.kmeans(
        data.vectors, k, niter=niter, seed=seed, sample_all=sample_all, init=init, nredo=nredo, name=name
    )


@task(name="build-index", cache_policy=NO_CACHE, persist_result=False)
def build_index(data: Embeddings, kind: str, name: str) -> NeighbourIndex:
    return NeighbourIndex.build(data.vectors, data.ids, kind=kind, name=name)


@task(
    name="save-clusters",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def save_outputs(result: KMeansResult, ids: list[str], index: NeighbourIndex | None, output_dir: str) -> str:
    # The index first: summary.json, written last by save_kmeans, marks the directory complete.
    if index is not None:
        index.save(storage.join(output_dir, "index"))
    return clustering.save_kmeans(result, ids, output_dir)


def default_output_dir(
    embeddings: str, k: int, niter: int, seed: int, index_kind: str, sample_all: bool, init: str, nredo: int
) -> str:
    """``outputs/clusters/<digest>``: the same embeddings and options always write the same place."""
    key = (
        f"{file_fingerprint(embeddings)}|k={k}|niter={niter}|seed={seed}|index={index_kind}"
        f"|all={sample_all}|init={init}|nredo={nredo}"
    )
    return f"outputs/clusters/{hashlib.sha256(key.encode()).hexdigest()[:20]}"


@flow(name="cluster", description="k-means clusters and a nearest-neighbour index over embeddings.",
      **with_failure_note(heartbeat_hooks()))
def cluster(
    embeddings: str,
    k: Annotated[int, Field(ge=1)],
    niter: Annotated[int, Field(ge=1, le=1000)] = 20,
    seed: Annotated[int, Field(ge=0)] = 0,
    index_kind: IndexKind = "auto",
    output_dir: OptionalText = "",
    sample_all: bool = True,
    init: Literal["kmeans++", "random"] = "kmeans++",
    nredo: Annotated[int, Field(ge=1, le=100)] = 1,
) -> dict[str, Any]:
    """Cluster the vectors, build the index, save both, and return a summary with sizes and inertia.

    Args:
        embeddings: Required. An embeddings file written by the encode flow (.npz or .parquet);
            relative paths are under the data dir.
        k: Required. Number of clusters, at least 1 and at most the number of vectors.
        niter: k-means iterations, 1 to 1000.
        seed: Seed for the initial centroids, 0 or more: same seed, same clusters.
        index_kind: Neighbour index: 'flat' (exact), 'ivf' (approximate, for large inputs), 'auto'
            (IVF from 50,000 vectors) or 'none'.
        output_dir: Directory for the results. Empty: outputs/clusters/DIGEST, named after the
            input and options.
        sample_all: Train on every vector (faiss alone samples at most 256 per cluster).
        init: Initial centroids: 'kmeans++' (spread out, robust) or 'random' (faiss's default).
        nredo: Initialisations to try, 1 to 100; the one with the lowest inertia is kept.
    """
    started = time.perf_counter()
    data = load_input(embeddings)
    load_seconds = time.perf_counter() - started

    kmeans_started = time.perf_counter()
    # quote(): Prefect would otherwise walk every id and vector row of large inputs, per task.
    result = train_kmeans(quote(data), k, niter, seed, sample_all, init, nredo, embeddings)
    kmeans_seconds = time.perf_counter() - kmeans_started

    index_started = time.perf_counter()
    index = build_index(quote(data), index_kind, embeddings) if index_kind != "none" else None
    index_seconds = time.perf_counter() - index_started

    save_started = time.perf_counter()
    output_dir = output_dir or default_output_dir(
        embeddings, k, niter, seed, index_kind, sample_all, init, nredo
    )
    location = save_outputs(quote(result), quote(data.ids), quote(index), output_dir)
    save_seconds = time.perf_counter() - save_started
    total_seconds = time.perf_counter() - started

    summary: dict[str, Any] = {
        "count": len(data),
        "dims": data.dims,
        "k": k,
        "inertia": result.inertia,
        "sizes": result.sizes.tolist(),
        "output_dir": location,
        "index_kind": index.kind if index is not None else "none",
        "seconds": round(total_seconds, 3),
    }
    timings = {"load": load_seconds, "k-means": kmeans_seconds, "index": index_seconds, "save": save_seconds}
    _publish(summary, result, timings, total_seconds)
    return summary


def _publish(summary: dict[str, Any], result: KMeansResult, timings: dict[str, float], total: float) -> None:
    rows = [
        ("vectors", summary["count"]),
        ("dimensions", summary["dims"]),
        ("clusters (k)", summary["k"]),
        ("trained on", f"{result.trained_on} vectors"),
        ("inertia", f"{summary['inertia']:.6g}"),
        ("index", summary["index_kind"]),
        ("output", f"`{storage.relative(summary['output_dir'])}`"),
        *((f"{step} (s)", f"{seconds:.2f}") for step, seconds in timings.items()),
        ("total (s)", f"{total:.2f}"),
    ]
    sizes = sorted(enumerate(summary["sizes"]), key=lambda pair: -pair[1])
    count = max(summary["count"], 1)
    markdown = markdown_table(["", "value"], rows)
    markdown += "\n\n## Cluster sizes\n\n" + cluster_sizes_chart(summary["sizes"]) + "\n\n" + markdown_table(
        ["cluster", "size", "share"], [(cluster, size, f"{100 * size / count:.1f}%") for cluster, size in sizes[:100]]
    )
    if len(sizes) > 100:
        markdown += f"\n\n... and {len(sizes) - 100} smaller clusters."
    publish_summary("cluster-summary", "Cluster", markdown)
