"""The encode and cluster flows on a real Prefect server: outputs, cache hits, artifacts, failed states."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

import json

import numpy as np
import pytest

from taskserver import clustering, encoding
from taskserver.errors import BatchFailedError
from taskserver.settings import reload_settings

TOPICS = {
    "sport": ["The striker scored twice in the cup final.", "The tennis match went to five sets.",
              "The marathon runner broke the course record.", "Our goalkeeper saved a late penalty.",
              "The football fans cheered as the referee blew the whistle.", "The basketball team clinched the title."],
    "cooking": ["Knead the dough and let it rise overnight.", "Simmer the tomato sauce with garlic and basil.",
                "Whisk the eggs with sugar until pale.", "Roast the vegetables with olive oil and thyme.",
                "Season the soup with salt and black pepper.", "Bake the bread until the crust is golden."],
    "finance": ["The central bank raised interest rates again.", "Shares fell after the quarterly earnings report.",
                "Bond yields climbed as inflation persisted.", "The company issued new stock to raise capital.",
                "Investors moved money into government bonds.", "The currency weakened against the dollar."],
}
TEXTS = [text for texts in TOPICS.values() for text in texts]
IDS = [f"{topic}-{number}" for topic, texts in TOPICS.items() for number in range(len(texts))]


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("data")
    previous = os.environ.get("TASKSERVER_DATA_DIR")
    os.environ["TASKSERVER_DATA_DIR"] = str(path)
    reload_settings()
    yield path
    if previous is None:
        os.environ.pop("TASKSERVER_DATA_DIR", None)
    else:
        os.environ["TASKSERVER_DATA_DIR"] = previous
    reload_settings()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoded(data_dir):
    from taskserver.flows.encode import encode

    return encode(texts=TEXTS, ids=IDS)


def read_artifact(key: str) -> str:
    """The newest artifact with ``key``, read over the REST API.

    Prefect 3.8.8's client sends explicit nulls (offset, flow_runs) that this server rejects
    with 422 under pydantic 2.14, so the request body is written out here.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1, "offset": 0}
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    found = response.json()
    return str(found[0]["data"]) if found else ""


def test_encode_flow_writes_what_the_library_computes(data_dir, encoded):
    assert encoded["count"] == len(TEXTS) and encoded["dims"] == 384
    assert encoded["output"].startswith(str(data_dir / "outputs" / "embeddings"))
    assert encoded["encoded"] == len(TEXTS) and encoded["cache_hits"] == 0
    loaded = encoding.load_embeddings(encoded["output"])
    direct = encoding.encode_texts(TEXTS, IDS)
    assert loaded.ids == IDS
    assert np.array_equal(loaded.vectors, direct.vectors)
    assert (data_dir / "cache" / "embeddings.sqlite").exists()


def test_encode_flow_again_is_served_from_the_cache_at_the_same_place(data_dir, encoded):
    from taskserver.flows.encode import encode

    again = encode(texts=TEXTS, ids=IDS)
    assert again["output"] == encoded["output"]
    assert again["cache_hits"] == len(TEXTS) and again["encoded"] == 0
    assert "| from cache | 18 |" in read_artifact("encode-summary")


def test_encode_flow_reads_a_jsonl_file(data_dir, encoded):
    from taskserver.flows.encode import encode

    lines = [json.dumps({"id": item, "text": text}) for item, text in zip(IDS, TEXTS)]
    (data_dir / "inputs").mkdir(exist_ok=True)
    (data_dir / "inputs" / "texts.jsonl").write_text("\n".join(lines) + "\n")
    summary = encode(input_path="inputs/texts.jsonl", output="outputs/from-file.parquet")
    loaded = encoding.load_embeddings("outputs/from-file.parquet")
    assert summary["count"] == len(TEXTS) and loaded.ids == IDS
    assert np.array_equal(loaded.vectors, encoding.load_embeddings(encoded["output"]).vectors)


def test_encode_flow_fails_naming_an_empty_input(data_dir):
    from taskserver.flows.encode import encode

    state = encode(texts=[], return_state=True)
    assert state.is_failed()
    assert "texts: no texts to encode" in state.message


def test_encode_flow_saves_good_texts_and_fails_naming_the_bad_ones(data_dir):
    from taskserver.flows.encode import encode

    state = encode(
        texts=["A fine sentence.", "", "Another fine one.", "   "],
        ids=["good-1", "blank", "good-2", "spaces"],
        output="outputs/partial.npz",
        return_state=True,
    )
    assert state.is_failed()
    assert "texts[1] (id 'blank'): empty text" in state.message
    assert "texts[3] (id 'spaces'): text is only whitespace" in state.message
    saved = encoding.load_embeddings("outputs/partial.npz")
    assert saved.ids == ["good-1", "good-2"]
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BatchFailedError)
    assert error.partial["count"] == 2 and set(error.failures) == {"texts[1] (id 'blank')", "texts[3] (id 'spaces')"}
    assert "## Failed texts" in read_artifact("encode-summary")


def test_encode_flow_fails_naming_a_missing_file(data_dir):
    from taskserver.flows.encode import encode

    state = encode(input_path="inputs/nope.jsonl", return_state=True)
    assert state.is_failed()
    assert "nope.jsonl: file not found" in state.message


def test_cluster_flow_saves_assignments_centroids_and_index(data_dir, encoded):
    from taskserver.flows.cluster import cluster

    summary = cluster(embeddings=encoded["output"], k=3, seed=0, nredo=10, output_dir="outputs/topics")
    out = data_dir / "outputs" / "topics"
    assert summary["output_dir"] == str(out)
    assert sorted(path.name for path in out.iterdir()) == ["assignments.csv", "centroids.npy", "index", "summary.json"]
    ids, result = clustering.load_kmeans("outputs/topics")
    vectors = encoding.load_embeddings(encoded["output"]).vectors
    library = clustering.kmeans(vectors, 3, seed=0, nredo=10)
    assert ids == IDS
    assert np.array_equal(result.assignments, library.assignments)
    assert result.inertia == pytest.approx(library.inertia) == pytest.approx(summary["inertia"])
    # Three clearly different topics land in three clusters.
    by_topic = {topic: {int(result.assignments[row]) for row, item in enumerate(ids) if item.startswith(topic)}
                for topic in TOPICS}
    assert all(len(found) == 1 for found in by_topic.values())
    assert len(set().union(*by_topic.values())) == 3
    index = clustering.NeighbourIndex.load("outputs/topics/index")
    assert index.kind == "flat"
    assert index.search(vectors[IDS.index("cooking-2")], k=1)[0][0][0] == "cooking-2"
    assert "## Cluster sizes" in read_artifact("cluster-summary")


def test_cluster_flow_fails_naming_the_embeddings_when_k_is_too_large(data_dir, encoded):
    from taskserver.flows.cluster import cluster

    state = cluster(embeddings=encoded["output"], k=50, return_state=True)
    assert state.is_failed()
    assert f"{encoded['output']}: k=50 clusters asked for only 18 vectors" in state.message


def test_every_flow_parameter_has_a_description_for_the_ui():
    from taskserver.flows.cluster import cluster
    from taskserver.flows.encode import encode

    for flow in (encode, cluster):
        properties = flow.parameters.model_dump()["properties"]
        missing = [name for name, schema in properties.items() if not schema.get("description")]
        assert not missing, f"{flow.name}: parameters without a description: {missing}"
