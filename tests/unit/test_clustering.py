"""Spec of taskserver.clustering: faiss k-means on all points, the neighbour index, bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from taskserver import clustering
from taskserver.clustering import NeighbourIndex, kmeans
from taskserver.errors import ClusteringInputError, ParameterError


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def blobs(per_cluster: int = 200, clusters: int = 5, dims: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims)) * 20
    labels = np.repeat(np.arange(clusters), per_cluster)
    points = centres[labels] + rng.normal(size=(len(labels), dims))
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), labels[order]


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_well_separated_blobs(seed):
    points, labels = blobs()
    result = kmeans(points, 5, seed=seed)
    assert result.assignments.shape == (1000,) and result.assignments.dtype == np.int64
    assert result.centroids.shape == (5, 16) and result.centroids.dtype == np.float32
    # Every true blob maps to exactly one cluster and every cluster to one blob.
    pairs = set(zip(labels.tolist(), result.assignments.tolist()))
    assert len(pairs) == 5
    assert sorted(result.sizes.tolist()) == [200] * 5


def test_inertia_is_the_sum_of_squared_distances_to_the_centroids():
    points, _ = blobs()
    result = kmeans(points, 5)
    expected = ((points - result.centroids[result.assignments]) ** 2).sum(dtype=np.float64)
    assert result.inertia == pytest.approx(expected, rel=1e-4)
    assert result.distances.sum(dtype=np.float64) == pytest.approx(result.inertia)


def test_same_seed_same_result_and_another_seed_may_differ():
    points = np.random.default_rng(1).normal(size=(600, 8)).astype(np.float32)
    first, second = kmeans(points, 7, seed=11), kmeans(points, 7, seed=11)
    assert np.array_equal(first.centroids, second.centroids)
    assert np.array_equal(first.assignments, second.assignments)
    assert not np.array_equal(first.centroids, kmeans(points, 7, seed=12).centroids)


def test_sample_all_trains_on_every_point_unlike_faiss_default():
    k = 3
    points = np.random.default_rng(2).normal(size=(256 * k * 4, 8)).astype(np.float32)
    full = kmeans(points, k, niter=10, seed=5)
    sampled = kmeans(points, k, niter=10, seed=5, sample_all=False)
    assert full.trained_on == len(points)
    assert sampled.trained_on == 256 * k
    # The same as faiss told to use every point, and not what faiss's 256-per-centroid sample gives.
    reference = faiss.Kmeans(
        8, k, niter=10, seed=5, max_points_per_centroid=len(points),
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    )
    reference.train(points)
    assert np.array_equal(full.centroids, reference.centroids)
    assert not np.array_equal(full.centroids, sampled.centroids)


def test_k_greater_than_n_names_the_input():
    with pytest.raises(ClusteringInputError, match=r"emb\.npz: k=5 clusters asked for only 3 vectors"):
        kmeans(np.ones((3, 4), dtype=np.float32), 5, name="emb.npz")


def test_nan_and_inf_rows_are_named():
    points = np.ones((6, 4), dtype=np.float32)
    points[1, 2] = np.nan
    points[4, 0] = np.inf
    with pytest.raises(ClusteringInputError, match=r"vectors: 2 rows contain NaN or infinity \(rows 1, 4\)"):
        kmeans(points, 2)


def test_wrong_shape_and_type_are_rejected():
    with pytest.raises(ClusteringInputError, match="expected a 2-D"):
        kmeans(np.ones(5), 1)
    with pytest.raises(ClusteringInputError, match="not a numeric matrix"):
        kmeans(np.array([["a", "b"]]), 1)
    with pytest.raises(ClusteringInputError, match="empty matrix"):
        kmeans(np.zeros((0, 4)), 1)
    with pytest.raises(ParameterError, match="init: unknown method 'best'"):
        kmeans(np.ones((4, 4)), 1, init="best")


def test_kmeans_save_and_load_round_trip(data_dir):
    points, _ = blobs(per_cluster=20)
    ids = [f"doc-{row}" for row in range(len(points))]
    result = kmeans(points, 5)
    location = clustering.save_kmeans(result, ids, "clusters/run")
    assert location == str(data_dir / "clusters" / "run")
    loaded_ids, loaded = clustering.load_kmeans("clusters/run")
    assert loaded_ids == ids
    assert np.array_equal(loaded.assignments, result.assignments)
    assert np.array_equal(loaded.centroids, result.centroids)
    assert loaded.inertia == result.inertia


def test_flat_index_finds_exact_neighbours_by_id():
    points, _ = blobs(per_cluster=50)
    ids = [f"p{row}" for row in range(len(points))]
    index = NeighbourIndex.build(points, ids)
    assert index.kind == "flat"
    hits = index.search(points[:3], k=4)
    assert [row[0][0] for row in hits] == ["p0", "p1", "p2"]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
    normed = points / np.linalg.norm(points, axis=1, keepdims=True)
    expected = np.argsort(-(normed @ normed[0]))[:4]
    assert [item for item, _ in hits[0]] == [ids[row] for row in expected]


def test_l2_metric_scores_are_squared_distances():
    points, _ = blobs(per_cluster=10)
    index = NeighbourIndex.build(points, metric="l2", kind="flat")
    (nearest, second), = index.search(points[0], k=2)
    assert nearest == ("0", pytest.approx(0.0, abs=1e-3))
    assert second[1] == pytest.approx(((points[int(second[0])] - points[0]) ** 2).sum(), rel=1e-4)


def test_index_save_load_round_trip_returns_the_same_neighbours(data_dir):
    points, _ = blobs(per_cluster=100)
    for kind in ("flat", "ivf"):
        index = NeighbourIndex.build(points, [f"id{row}" for row in range(len(points))], kind=kind)
        before = index.search(points[:20], k=5)
        index.save(f"indexes/{kind}")
        loaded = NeighbourIndex.load(f"indexes/{kind}")
        assert (loaded.kind, loaded.metric, loaded.nprobe) == (kind, "cosine", index.nprobe)
        assert loaded.search(points[:20], k=5) == before


def test_ivf_is_chosen_automatically_for_large_inputs(monkeypatch):
    assert clustering.choose_index_kind(clustering.IVF_MIN_POINTS - 1) == "flat"
    assert clustering.choose_index_kind(clustering.IVF_MIN_POINTS) == "ivf"
    points, _ = blobs(per_cluster=400)
    monkeypatch.setattr(clustering, "IVF_MIN_POINTS", 1000)
    index = NeighbourIndex.build(points, kind="auto")
    assert index.kind == "ivf"
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexIVFFlat)
    assert index.search(points[7], k=1)[0][0][0] == "7"
    assert NeighbourIndex.build(points, kind="flat").kind == "flat"


def test_index_input_errors_name_the_input():
    points, _ = blobs(per_cluster=10)
    index = NeighbourIndex.build(points)
    with pytest.raises(ClusteringInputError, match="queries: 3 dimensions, but the index holds 16"):
        index.search(np.ones((1, 3)), k=1)
    with pytest.raises(ClusteringInputError, match="ids: 2 ids for 50 vectors"):
        NeighbourIndex.build(points, ["a", "b"])
    with pytest.raises(ParameterError, match="index_kind: unknown kind 'hnsw'"):
        NeighbourIndex.build(points, kind="hnsw")
    assert len(index.search(points[0], k=500)[0]) == 50


def test_loading_a_damaged_index_is_refused(data_dir):
    points, _ = blobs(per_cluster=10)
    NeighbourIndex.build(points).save("idx")
    with open(data_dir / "idx" / "ids.json", "w") as handle:
        handle.write('["x"]')
    with pytest.raises(ClusteringInputError, match="ids.json does not match meta.json"):
        NeighbourIndex.load("idx")
    with pytest.raises(ClusteringInputError, match="not a saved neighbour index"):
        NeighbourIndex.load("nowhere")


def test_more_initialisations_never_give_a_worse_fit():
    points = np.random.default_rng(4).normal(size=(500, 8)).astype(np.float32)
    single = kmeans(points, 9, seed=2, init="random")
    best_of_five = kmeans(points, 9, seed=2, init="random", nredo=5)
    assert best_of_five.nredo == 5
    assert best_of_five.inertia <= single.inertia + 1e-6
