"""Benchmark: the ``cluster`` flow against bare faiss, and faiss against scikit-learn k-means.

1. Flow overhead: the ``cluster`` flow (flat index) against the same work in plain faiss code
   (load the .npz, k-means, assign, flat index, write the outputs), and against faiss k-means
   alone. Target: flow >= 0.95x the same-work baseline.
2. faiss against scikit-learn ``KMeans`` at equal iterations (k-means++ init, one init, tol=0),
   reporting time and inertia for each.
Data: float32 vectors around random centres, normalised like sentence embeddings
(100k x 384 with k=100, or 10k x 384 with k=50 under ``--quick``).

    python benchmarks/bench_cluster.py [--quick] [--repeats N] [--no-sklearn]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np


def synthetic_vectors(count: int, dims: int, centres: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middles = rng.normal(size=(centres, dims)).astype(np.float32)
    labels = rng.integers(0, centres, size=count)
    vectors = middles[labels] + 0.6 * rng.normal(size=(count, dims)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def bare_same_work(location: str, out: str, k: int, niter: int, seed: int) -> float:
    """What the flow does, written directly against numpy and faiss."""
    import faiss

    with np.load(location, allow_pickle=False) as data:
        vectors, ids = data["vectors"], data["ids"].tolist()
    n, d = vectors.shape
    trainer = faiss.Kmeans(
        d, k, niter=niter, seed=seed, max_points_per_centroid=n // k + 2, min_points_per_centroid=1,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    )
    trainer.train(vectors)
    distances, assignments = trainer.index.search(vectors, 1)
    normed = vectors.copy()
    faiss.normalize_L2(normed)
    index = faiss.IndexFlatIP(d)
    index.add(normed)
    os.makedirs(out, exist_ok=True)
    faiss.write_index(index, os.path.join(out, "index.faiss"))
    np.save(os.path.join(out, "centroids.npy"), trainer.centroids)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["id", "cluster", "distance"])
    writer.writerows(zip(ids, assignments[:, 0].tolist(), distances[:, 0].tolist()))
    with open(os.path.join(out, "assignments.csv"), "w") as handle:
        handle.write(table.getvalue())
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump({"inertia": float(distances.sum(dtype=np.float64))}, handle)
    return float(distances.sum(dtype=np.float64))


def timed(function):
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k vectors and k=50 instead of 100k and k=100")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; medians are reported")
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn comparison")
    args = parser.parse_args()
    count, k = (10_000, 50) if args.quick else (100_000, 100)
    dims, seed, niter = 384, 0, args.niter

    data_dir = tempfile.mkdtemp(prefix="bench-cluster-")
    os.environ["TASKSERVER_DATA_DIR"] = data_dir
    import faiss
    from prefect.testing.utilities import prefect_test_harness

    # Flows run as the job lane runs them (taskserver.platform.job_engine): no engine heartbeat thread.
    from taskserver.flows.heartbeats import without_engine_heartbeats

    from taskserver import clustering, encoding
    from taskserver.flows.cluster import cluster
    from taskserver.settings import reload_settings

    reload_settings()
    vectors = synthetic_vectors(count, dims, centres=k)
    ids = [f"v{row}" for row in range(count)]
    location = encoding.save_embeddings(encoding.Embeddings(ids, vectors), "inputs/vectors.npz")
    print(f"vectors: {count} x {dims}, k={k}, niter={niter}, faiss threads {faiss.omp_get_max_threads()}")

    kmeans_only, same_work, flow_times = [], [], []
    with prefect_test_harness(server_startup_timeout=120), without_engine_heartbeats():
        cluster(embeddings=location, k=2, niter=1, index_kind="flat", output_dir="outputs/warmup")
        for _ in range(args.repeats):
            seconds, _ = timed(lambda: clustering.kmeans(vectors, k, niter=niter, seed=seed))
            kmeans_only.append(seconds)
            seconds, bare_inertia = timed(
                lambda: bare_same_work(location, os.path.join(data_dir, "outputs/bare"), k, niter, seed)
            )
            same_work.append(seconds)
            seconds, summary = timed(
                lambda: cluster(embeddings=location, k=k, niter=niter, seed=seed, index_kind="flat",
                                output_dir="outputs/flow")
            )
            flow_times.append(seconds)

    bare, flow, alone = statistics.median(same_work), statistics.median(flow_times), statistics.median(kmeans_only)
    print(f"\n{'run':42} {'seconds':>8} {'flow ratio':>11}")
    print(f"{'bare faiss k-means (train + assign only)':42} {alone:8.2f} {alone / flow:10.3f}x")
    print(f"{'bare faiss, same work as the flow':42} {bare:8.2f} {bare / flow:10.3f}x")
    print(f"{'cluster flow (flat index)':42} {flow:8.2f}")
    print(f"all runs (s): kmeans {[round(t, 2) for t in kmeans_only]}, same work {[round(t, 2) for t in same_work]},"
          f" flow {[round(t, 2) for t in flow_times]}")
    print(f"inertia: flow {summary['inertia']:.6g}, bare {bare_inertia:.6g}")
    print("target: flow >= 0.95x bare same-work")

    if not args.no_sklearn:
        from sklearn.cluster import KMeans

        faiss_seconds, faiss_result = timed(lambda: clustering.kmeans(vectors, k, niter=niter, seed=seed))
        model = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd",
                       random_state=seed)
        sklearn_seconds, _ = timed(lambda: model.fit(vectors))
        # scikit-learn stops early once no point changes cluster, so per-iteration time is shown too.
        print(f"\n{'k-means, max ' + str(niter) + ' iterations':30} {'seconds':>8} {'iterations':>10}"
              f" {'s/iteration':>12} {'inertia':>12}")
        print(f"{'faiss (taskserver.kmeans)':30} {faiss_seconds:8.2f} {niter:10d} {faiss_seconds / niter:12.3f}"
              f" {faiss_result.inertia:12.6g}")
        print(f"{'scikit-learn KMeans (lloyd)':30} {sklearn_seconds:8.2f} {model.n_iter_:10d}"
              f" {sklearn_seconds / model.n_iter_:12.3f} {model.inertia_:12.6g}")
        print(f"faiss speed-up over scikit-learn: {sklearn_seconds / faiss_seconds:.2f}x total,"
              f" {(sklearn_seconds / model.n_iter_) / (faiss_seconds / niter):.2f}x per iteration"
              " (both times include k-means++ initialisation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
