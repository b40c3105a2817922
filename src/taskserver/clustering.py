"""k-means clusters and a nearest-neighbour index over embedding vectors, with faiss.

k-means trains on every point by default (faiss alone samples 256 per centroid), is seeded,
and reports inertia. The index answers queries with the caller's ids and saves to storage.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from taskserver import storage
from taskserver.errors import ClusteringInputError, ParameterError

INDEX_KINDS = ("auto", "flat", "ivf")
INIT_METHODS = ("kmeans++", "random")
METRICS = ("cosine", "l2")

IVF_MIN_POINTS = 50_000
"""``kind="auto"`` builds an IVF index from this many vectors up; below it an exact flat index
is fast enough (a flat search over 50k x 384 takes milliseconds per query)."""

IVF_TRAINING_POINTS_PER_LIST = 39
"""faiss wants at least 39 training points per inverted list."""


@dataclass(eq=False)
class KMeansResult:
    """Cluster of every point, the centroids, and the fit."""

    assignments: np.ndarray
    """int64 (n,): the cluster of each point."""
    distances: np.ndarray
    """float32 (n,): squared L2 distance from each point to its centroid."""
    centroids: np.ndarray
    """float32 (k, d)."""
    inertia: float
    """Sum of squared distances of the points to their centroids."""
    k: int
    niter: int
    seed: int
    trained_on: int
    nredo: int = 1
    """How many points the centroids were trained on (all of them unless ``sample_all=False``)."""

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignments, minlength=self.k)


def as_vectors(vectors: Any, name: str = "vectors") -> np.ndarray:
    """A C-contiguous float32 (n, d) copy-if-needed of ``vectors``, or an error naming ``name``."""
    try:
        array = np.asarray(vectors)
    except (TypeError, ValueError) as exc:
        raise ClusteringInputError(name, f"not a numeric matrix ({exc})") from None
    if array.dtype.kind not in "fiu":
        raise ClusteringInputError(name, f"not a numeric matrix (dtype {array.dtype})")
    if array.ndim != 2:
        raise ClusteringInputError(name, f"expected a 2-D (n, d) matrix, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ClusteringInputError(name, f"empty matrix (shape {array.shape})")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        listed = ", ".join(str(row) for row in rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        raise ClusteringInputError(
            name, f"{len(rows)} rows contain NaN or infinity (rows {listed})", "drop or re-encode those rows"
        )
    return array


def kmeans(
    vectors: Any,
    k: int,
    niter: int = 20,
    seed: int = 0,
    sample_all: bool = True,
    init: str = "kmeans++",
    nredo: int = 1,
    name: str = "vectors",
) -> KMeansResult:
    """Lloyd's k-means with faiss: initial centroids drawn with ``seed``, then ``niter`` iterations.

    ``init="kmeans++"`` (default) spreads the initial centroids out, which avoids two centroids
    splitting one cluster at the cost of about two iterations; ``"random"`` is faiss's default.
    ``sample_all=False`` keeps faiss's default of training on at most 256 points per centroid,
    which is faster on large inputs but ignores the rest. ``nredo`` runs that many
    initialisations and keeps the one with the lowest inertia. ``name`` names the input in errors.
    """
    import faiss

    data = as_vectors(vectors, name)
    n, d = data.shape
    if k < 1:
        raise ClusteringInputError("k", f"must be at least 1, got {k}")
    if k > n:
        raise ClusteringInputError(name, f"k={k} clusters asked for only {n} vectors", "lower k or add vectors")
    if niter < 1:
        raise ClusteringInputError("niter", f"must be at least 1, got {niter}")
    if nredo < 1:
        raise ClusteringInputError("nredo", f"must be at least 1, got {nredo}")
    if init not in INIT_METHODS:
        raise ParameterError("init", f"unknown method {init!r}", f"choose one of: {', '.join(INIT_METHODS)}")
    options: dict[str, Any] = {
        "niter": niter,
        "nredo": nredo,
        "seed": seed,
        "verbose": False,
        "min_points_per_centroid": 1,
        "init_method": (
            faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS if init == "kmeans++" else faiss.ClusteringInitMethod_RANDOM
        ),
    }
    if sample_all:
        options["max_points_per_centroid"] = math.ceil(n / k) + 1
    trainer = faiss.Kmeans(d, k, **options)
    trainer.train(data)
    trained_on = min(n, k * trainer.cp.max_points_per_centroid)
    centroids = np.ascontiguousarray(trainer.centroids, dtype=np.float32)
    distances, assignments = trainer.index.search(data, 1)
    distances = np.maximum(distances[:, 0], 0.0).astype(np.float32)  # rounding can give -1e-7
    return KMeansResult(
        assignments=assignments[:, 0].astype(np.int64),
        distances=distances,
        centroids=centroids,
        inertia=float(distances.astype(np.float64).sum()),
        k=k,
        niter=niter,
        seed=seed,
        trained_on=int(trained_on),
        nredo=nredo,
    )


def save_kmeans(result: KMeansResult, ids: Sequence[str], location: str) -> str:
    """Write ``assignments.csv`` (id, cluster, distance), ``centroids.npy`` and ``summary.json``.

    Each file is written atomically; ``summary.json`` is written last, so its presence means
    the other two are complete.
    """
    if len(ids) != len(result.assignments):
        raise ClusteringInputError("ids", f"{len(ids)} ids for {len(result.assignments)} assignments")
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["id", "cluster", "distance"])
    for item, cluster, distance in zip(ids, result.assignments.tolist(), result.distances.tolist()):
        writer.writerow([item, cluster, f"{distance:.6g}"])
    storage.write_text(storage.join(location, "assignments.csv"), table.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, result.centroids)
    storage.write_bytes(storage.join(location, "centroids.npy"), buffer.getvalue())
    summary = {
        "k": result.k,
        "niter": result.niter,
        "seed": result.seed,
        "nredo": result.nredo,
        "count": len(ids),
        "dims": int(result.centroids.shape[1]),
        "trained_on": result.trained_on,
        "inertia": result.inertia,
        "sizes": result.sizes.tolist(),
    }
    storage.write_text(storage.join(location, "summary.json"), json.dumps(summary, indent=2))
    return storage.resolve(location)


def load_kmeans(location: str) -> tuple[list[str], KMeansResult]:
    """``(ids, result)`` from what ``save_kmeans`` wrote."""
    summary_location = storage.join(location, "summary.json")
    if not storage.exists(summary_location):
        raise ClusteringInputError(location, "no summary.json: not a finished clustering output")
    summary = json.loads(storage.read_bytes(summary_location))
    centroids = np.load(io.BytesIO(storage.read_bytes(storage.join(location, "centroids.npy"))), allow_pickle=False)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(location, "assignments.csv")).decode())))
    distances = np.array([float(row["distance"]) for row in rows], dtype=np.float32)
    result = KMeansResult(
        assignments=np.array([int(row["cluster"]) for row in rows], dtype=np.int64),
        distances=distances,
        centroids=np.ascontiguousarray(centroids, dtype=np.float32),
        inertia=float(summary["inertia"]),
        k=int(summary["k"]),
        niter=int(summary["niter"]),
        seed=int(summary["seed"]),
        trained_on=int(summary["trained_on"]),
        nredo=int(summary.get("nredo", 1)),
    )
    return [row["id"] for row in rows], result


def choose_index_kind(count: int) -> str:
    """``"ivf"`` from ``IVF_MIN_POINTS`` vectors up, otherwise ``"flat"`` (exact)."""
    return "ivf" if count >= IVF_MIN_POINTS else "flat"


def default_nlist(count: int) -> int:
    """About 4 * sqrt(n) inverted lists, never fewer than 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(count)), count // IVF_TRAINING_POINTS_PER_LIST))


class NeighbourIndex:
    """Nearest neighbours by cosine similarity (default) or squared L2 distance, answered with ids."""

    def __init__(self, index: Any, ids: Sequence[str], kind: str, metric: str, nprobe: int = 1) -> None:
        self.index = index
        self.ids = [str(item) for item in ids]
        self.kind = kind
        self.metric = metric
        self.nprobe = nprobe
        if index.ntotal != len(self.ids):
            raise ClusteringInputError("ids", f"{len(self.ids)} ids for an index of {index.ntotal} vectors")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dims(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(
        cls,
        vectors: Any,
        ids: Sequence[str] | None = None,
        kind: str = "auto",
        metric: str = "cosine",
        nlist: int | None = None,
        nprobe: int | None = None,
        name: str = "vectors",
    ) -> NeighbourIndex:
        """An exact flat index, or IVF (approximate, faster on large n); ``auto`` picks by size."""
        import faiss

        if kind not in INDEX_KINDS:
            raise ParameterError("index_kind", f"unknown kind {kind!r}", f"choose one of: {', '.join(INDEX_KINDS)}")
        if metric not in METRICS:
            raise ParameterError("metric", f"unknown metric {metric!r}", f"choose one of: {', '.join(METRICS)}")
        data = as_vectors(vectors, name)
        n, d = data.shape
        ids = [str(item) for item in ids] if ids is not None else [str(row) for row in range(n)]
        if len(ids) != n:
            raise ClusteringInputError("ids", f"{len(ids)} ids for {n} vectors in {name}")
        if len(set(ids)) != n:
            raise ClusteringInputError("ids", "ids are not unique", "give every vector its own id")
        if metric == "cosine":
            data = data.copy()
            faiss.normalize_L2(data)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        chosen = choose_index_kind(n) if kind == "auto" else kind
        if chosen == "flat":
            index = faiss.index_factory(d, "Flat", faiss_metric)
            probes = 1
        else:
            lists = nlist or default_nlist(n)
            if lists > n:
                raise ClusteringInputError(name, f"nlist={lists} inverted lists for only {n} vectors")
            index = faiss.index_factory(d, f"IVF{lists},Flat", faiss_metric)
            faiss.extract_index_ivf(index).cp.min_points_per_centroid = 1
            index.train(data)
            probes = nprobe or min(lists, max(8, lists // 8))
        index.add(data)
        return cls(index, ids, chosen, metric, probes)

    def search(self, queries: Any, k: int = 10, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest ids with their score for each query (fewer if the index is smaller).

        Scores are cosine similarities (higher is nearer) or squared L2 distances (lower is nearer).
        """
        import faiss

        array = np.asarray(queries)
        if array.ndim == 1:
            array = array[None, :]
        data = as_vectors(array, "queries")
        if data.shape[1] != self.dims:
            raise ClusteringInputError(
                "queries", f"{data.shape[1]} dimensions, but the index holds {self.dims}-dimensional vectors"
            )
        if k < 1:
            raise ClusteringInputError("k", f"must be at least 1, got {k}")
        if self.metric == "cosine":
            data = data.copy()
            faiss.normalize_L2(data)
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = nprobe or self.nprobe
        scores, positions = self.index.search(data, min(k, len(self.ids)))
        return [
            [(self.ids[position], float(score)) for position, score in zip(row_positions, row_scores) if position >= 0]
            for row_positions, row_scores in zip(positions.tolist(), scores.tolist())
        ]

    def save(self, location: str) -> str:
        """A directory with ``index.faiss``, ``ids.json`` and ``meta.json`` (written last, atomically)."""
        import faiss

        blob = faiss.serialize_index(self.index).tobytes()
        storage.write_bytes(storage.join(location, "index.faiss"), blob)
        ids_text = json.dumps(self.ids)
        storage.write_text(storage.join(location, "ids.json"), ids_text)
        meta = {
            "kind": self.kind,
            "metric": self.metric,
            "nprobe": self.nprobe,
            "count": len(self.ids),
            "dims": self.dims,
            "index_sha256": hashlib.sha256(blob).hexdigest(),
            "ids_sha256": hashlib.sha256(ids_text.encode()).hexdigest(),
        }
        storage.write_text(storage.join(location, "meta.json"), json.dumps(meta, indent=2))
        return storage.resolve(location)

    @classmethod
    def load(cls, location: str) -> NeighbourIndex:
        import faiss

        meta_location = storage.join(location, "meta.json")
        if not storage.exists(meta_location):
            raise ClusteringInputError(location, "no meta.json: not a saved neighbour index")
        meta = json.loads(storage.read_bytes(meta_location))
        blob = storage.read_bytes(storage.join(location, "index.faiss"))
        if hashlib.sha256(blob).hexdigest() != meta["index_sha256"]:
            raise ClusteringInputError(location, "index.faiss does not match meta.json (overwritten or damaged)")
        ids_raw = storage.read_bytes(storage.join(location, "ids.json"))
        if hashlib.sha256(ids_raw).hexdigest() != meta["ids_sha256"]:
            raise ClusteringInputError(location, "ids.json does not match meta.json (overwritten or damaged)")
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        ids = json.loads(ids_raw)
        return cls(index, ids, meta["kind"], meta["metric"], int(meta.get("nprobe", 1)))
