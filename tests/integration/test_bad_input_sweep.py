"""One sweep of bad input through every flow on a real Prefect server, plus the submission paths.

Each case runs the real flow and asserts the failed run's final state message names the input
and the reason. Mixed batches keep every good result. `taskserver submit` and
`prefect deployment run` refuse bad requests before any flow run exists.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pdf_factory
import pytest
from text_factory import topic_rows, write_rows

from platform_support import BIN, base_env, count_runs, run

pytestmark = [pytest.mark.torch_threads(1), pytest.mark.usefixtures("prefect_harness")]

PDF_CASES = {  # name -> (factory, reason the final state must give)
    "corrupt": (pdf_factory.corrupt_pdf, "damaged structure"),
    "truncated": (pdf_factory.truncated_pdf, "truncated"),
    "zero-byte": (pdf_factory.empty_file, "the file is empty (0 bytes)"),
    "encrypted": (pdf_factory.encrypted_pdf, "needs a password"),
    "image-only": (pdf_factory.image_only_pdf, "no text layer"),
    "not-a-pdf": (pdf_factory.not_a_pdf, "not a PDF"),
}




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A real (tiny, two-step) model from the training library: infer only needs a valid one."""
    from taskserver.training import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("model")
    data = write_rows(root / "topics.jsonl", topic_rows(6, seed=3))
    result = train_classifier(TrainConfig(
        data_path=str(data), output_dir=str(root / "run"), epochs=1, batch_size=8, max_length=16,
        max_steps=2, checkpoint_every=100, validation_fraction=0.25,
    ))
    return result.model_dir


def _embeddings(path: Path, vectors: np.ndarray) -> str:
    from taskserver.encoding import Embeddings, save_embeddings

    return save_embeddings(Embeddings([f"v{i}" for i in range(len(vectors))], vectors), str(path))


# -- the table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    flow: str
    make: Callable[[Path, Any], dict[str, Any]]
    """Builds the flow's parameters from (tmp_path, model_dir fixture or None)."""
    expect: tuple[str, ...]
    """Fragments the failed state's message must contain: the input and the reason."""


def _pdf_case(flow: str, kind: str) -> Case:
    factory, reason = PDF_CASES[kind]

    def make(tmp: Path, _model: Any) -> dict[str, Any]:
        source = factory(tmp / f"{kind}.pdf")
        return {"inputs": [str(source)], "output_dir": str(tmp / "out"), "workers": 1}

    return Case(flow, make, (f"{kind}.pdf: ", reason))


def _train_case(tmp: Path, _model: Any) -> dict[str, Any]:
    data = write_rows(tmp / "one-class.jsonl", [{"text": f"text {i}", "label": "only"} for i in range(12)])
    return {"data_path": str(data), "output_dir": str(tmp / "run")}


CASES: dict[str, Case] = {
    **{f"process-pdfs-{kind}": _pdf_case("process-pdfs", kind) for kind in PDF_CASES},
    **{f"ingest-documents-{kind}": _pdf_case("ingest-documents", kind) for kind in PDF_CASES},
    "encode-empty-text-list": Case("encode", lambda tmp, _: {"texts": []}, ("texts: no texts to encode",)),
    "encode-only-blank-texts": Case(
        "encode", lambda tmp, _: {"texts": ["", "   "]},
        ("texts[0] (id '0'): empty text", "texts[1] (id '1'): text is only whitespace"),
    ),
    "cluster-nan-vectors": Case(
        "cluster",
        lambda tmp, _: {"embeddings": _embeddings(
            tmp / "nan.npz", np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.5], [0.2, 0.9]], dtype=np.float32)), "k": 2},
        ("nan.npz: 1 rows contain NaN or infinity (rows 1)",),
    ),
    "cluster-k-above-n": Case(
        "cluster",
        lambda tmp, _: {"embeddings": _embeddings(tmp / "three.npz", np.eye(3, dtype=np.float32)), "k": 5},
        ("three.npz: k=5 clusters asked for only 3 vectors",),
    ),
    "train-single-class": Case("train", _train_case, ("one-class.jsonl", "only one class ('only')")),
    "infer-missing-model-dir": Case(
        "infer", lambda tmp, _: {"model_dir": str(tmp / "no-model"), "texts": ["hello"]},
        ("no-model: model directory not found",),
    ),
    "infer-only-blank-texts": Case(
        "infer", lambda tmp, model: {"model_dir": model, "texts": [" "]},
        ("texts[0] (id '0'): text is only whitespace",),
    ),
}


def _flow(name: str):
    from taskserver.flows.cluster import cluster
    from taskserver.flows.encode import encode
    from taskserver.flows.infer import infer
    from taskserver.flows.ingest import ingest_documents
    from taskserver.flows.pdfs import process_pdfs
    from taskserver.flows.train import train

    return {"process-pdfs": process_pdfs, "ingest-documents": ingest_documents, "encode": encode,
            "cluster": cluster, "train": train, "infer": infer}[name]


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_fails_the_run_naming_the_input_and_the_reason(case_id, tmp_path, data_dir, request):
    case = CASES[case_id]
    model = request.getfixturevalue("model_dir") if case.flow == "infer" else None
    parameters = case.make(tmp_path, model)

    state = _flow(case.flow)(**parameters, return_state=True)

    assert state.is_failed(), f"{case_id}: ended {state.type}: {state.message}"
    for fragment in case.expect:
        assert fragment in state.message, f"{case_id}: {fragment!r} not in {state.message!r}"


def test_one_megabyte_text_is_embedded_from_a_file_clipped_at_the_model_window(tmp_path, data_dir):
    """The encoder sees at most 256 word pieces: a 1 MB text embeds exactly like its first few kB."""
    from taskserver.encoding import encode_texts, load_embeddings
    from taskserver.flows.encode import encode

    big = _megabyte_text()
    source = tmp_path / "big.txt"
    source.write_text(big + "\n")
    state = encode(input_path=str(source), output=str(tmp_path / "big.npz"), use_cache=False, return_state=True)

    assert state.is_completed(), (state.message or "")[:500]
    saved = load_embeddings(str(tmp_path / "big.npz"))
    assert saved.vectors.shape == (1, 384)
    head = encode_texts([big[:4000]], ["head"], normalize=True)
    assert np.allclose(saved.vectors[0], head.vectors[0], atol=1e-5)


def test_one_megabyte_text_as_a_parameter_is_refused_by_the_server_before_the_run_exists(tmp_path, data_dir):
    """Prefect caps a run's parameters at 512 kB: the flow's docs say to pass large inputs as a file."""
    from prefect.exceptions import PrefectHTTPStatusError

    from taskserver.flows.encode import encode

    before = run(count_runs())
    with pytest.raises(PrefectHTTPStatusError) as refused:
        encode(texts=[_megabyte_text()], output=str(tmp_path / "big.npz"), return_state=True)
    assert refused.value.response.status_code == 422
    assert "Flow run parameters must be less than 524,288 bytes" in refused.value.response.text[:2000]
    assert run(count_runs()) == before
    assert not (tmp_path / "big.npz").exists()


def _megabyte_text() -> str:
    words = " ".join(f"word{i % 97} river{i % 13}" for i in range(80_000))
    return (words * (1_000_000 // len(words) + 1))[:1_000_000]


# -- mixed batches: every good result is kept, every bad input is named -------------------------

def test_process_pdfs_mixed_batch_keeps_good_files_and_names_all_six_bad_kinds(tmp_path, data_dir):
    from taskserver import documents
    from taskserver.flows.pdfs import process_pdfs

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = [pdf_factory.text_pdf(inbox / "good-a.pdf", pages=1, seed=4),
            pdf_factory.text_pdf(inbox / "good-b.pdf", pages=2, seed=5)]
    for kind, (factory, _) in PDF_CASES.items():
        factory(inbox / f"{kind}.pdf")
    out = tmp_path / "out"

    state = process_pdfs(inputs=str(inbox), output_dir=str(out), max_characters=400, workers=1, return_state=True)

    assert state.is_failed()
    assert "6 of 8 inputs" in state.message
    for kind, (_, reason) in PDF_CASES.items():
        assert f"{kind}.pdf: " in state.message and reason in state.message, (kind, state.message)
    assert "good-a.pdf:" not in state.message and "good-b.pdf:" not in state.message
    for pdf in good:
        saved = documents.load_chunks(str(out / f"{pdf.stem}.chunks.jsonl"))
        assert saved and saved == documents.process_pdf(pdf, max_characters=400).chunks
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}.{part}.jsonl" for p in good for part in ("chunks", "elements"))


def test_encode_file_mixed_batch_saves_the_good_texts_and_names_the_bad_records(tmp_path, data_dir):
    from taskserver.encoding import encode_texts, load_embeddings
    from taskserver.flows.encode import encode

    records = [{"id": "a", "text": "the striker scored twice"}, {"id": "b", "text": ""},
               {"id": "c", "text": "heavy rain is expected tomorrow"}, {"id": "d"},
               {"id": "e", "text": 42}, {"id": "f", "text": "   "}, {"id": "g", "text": "chop the onions finely"}]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))

    state = encode(input_path=str(source), output=str(tmp_path / "mixed.npz"), return_state=True)

    assert state.is_failed()
    assert "4 of 7 inputs" in state.message
    for row, item, reason in [(1, "b", "empty text"), (3, "d", "missing text (got None)"),
                              (4, "e", "not a string (got int)"), (5, "f", "text is only whitespace")]:
        assert f"{source}[{row}] (id '{item}'): {reason}" in state.message, state.message
    saved = load_embeddings(str(tmp_path / "mixed.npz"))
    assert saved.ids == ["a", "c", "g"]
    expected = encode_texts([records[0]["text"], records[2]["text"], records[6]["text"]], ["a", "c", "g"])
    assert np.allclose(saved.vectors, expected.vectors, atol=1e-5)


def test_infer_mixed_batch_writes_the_good_predictions_and_names_the_blank_texts(tmp_path, data_dir, model_dir):
    from taskserver.flows.infer import infer
    from taskserver.inference import Classifier

    texts = ["the striker scored twice", "", "heavy rain is expected tomorrow", "  \n", "chop the onions finely"]
    out = tmp_path / "predictions.jsonl"

    state = infer(model_dir=model_dir, texts=texts, output_path=str(out), return_state=True)

    assert state.is_failed()
    assert "2 of 5 inputs" in state.message
    assert "texts[1] (id '1'): empty text" in state.message
    assert "texts[3] (id '3'): text is only whitespace" in state.message
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in written] == ["0", "2", "4"]
    expected = Classifier.load(model_dir).predict([texts[0], texts[2], texts[4]])
    assert [row["label"] for row in written] == [p.label for p in expected]
    for row, prediction in zip(written, expected):
        assert row["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-5)


# -- submission: refused before any flow run exists ----------------------------------------------

def _taskserver(api_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "taskserver"), *args], env=base_env(PREFECT_API_URL=api_url),
                          capture_output=True, text=True, timeout=120)


SUBMIT_CASES = {
    "unknown-priority": (["submit", "probe", "-p", "urgent", "--param", "label=x"],
                         ["urgent", "choose one of: critical, high, normal, low"]),
    "unknown-task": (["submit", "transcode", "-p", "high"], ["transcode", "unknown task", "encode"]),
    "wrong-type": (["submit", "probe", "-p", "high", "--param", "label=x", "--param", "seconds=abc"],
                   ["probe/high parameters", "seconds", "'abc' is not of type 'number'"]),
    "unknown-parameter": (["submit", "probe", "-p", "high", "--param", "label=x", "--param", "colour=red"],
                          ["colour", "not a parameter of this flow"]),
}


@pytest.mark.parametrize("case_id", list(SUBMIT_CASES))
def test_taskserver_submit_refuses_bad_requests_and_creates_no_run(case_id, prefect_server):
    argv, fragments = SUBMIT_CASES[case_id]
    before = run(count_runs())

    result = _taskserver(prefect_server.api_url, *argv)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert run(count_runs()) == before


def test_prefect_deployment_run_with_a_wrong_type_is_refused_by_the_server(prefect_server):
    """Deployments enforce their parameter schema, so Prefect's own CLI cannot queue a bad run either."""
    before = run(count_runs())
    env = base_env(PREFECT_API_URL=prefect_server.api_url)

    result = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "probe/high", "--param", "label=x", "--param", "seconds=abc"],
        env=env, capture_output=True, text=True, timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Error creating flow run: Validation failed for field 'seconds'" in output, output
    assert "'abc' is not of type 'number'" in output, output
    assert run(count_runs()) == before
