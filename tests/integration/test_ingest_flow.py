"""The ingest-documents pipeline on a real Prefect server, with real PDFs, model and faiss."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from prefect.states import State

from taskserver import encoding
from taskserver.errors import BatchFailedError
from taskserver.samples import sample_pdfs
from taskserver.search import Collection, search
import pdf_factory

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_sample_pdfs_become_a_searchable_clustered_collection(tmp_path):
    from taskserver.flows.ingest import ingest_documents

    inputs = tmp_path / "in"
    inputs.mkdir()
    for pdf in sample_pdfs():
        shutil.copy(pdf, inputs / pdf.name)

    summary = ingest_documents(inputs=str(inputs), output_dir=str(tmp_path / "out"))

    assert summary.documents == 3
    assert summary.failures == {}
    collection = Collection(summary.output_dir)
    chunks = collection.chunks()
    assert len(chunks) == summary.chunks > 3
    assert sum(summary.cluster_sizes) == summary.chunks
    embeddings = encoding.load_embeddings(collection.embeddings_location)
    assert embeddings.ids == list(chunks)  # every chunk embedded once, in catalogue order
    assert embeddings.vectors.dtype == np.float32 and embeddings.vectors.shape[1] == 384

    hits = search(summary.output_dir, "how does training survive preemption?", k=1)
    assert hits[0].source.endswith("gpu-scheduling.pdf")
    assert "checkpoint" in hits[0].text.lower()


def test_bad_pdf_fails_the_run_by_name_but_the_good_ones_are_indexed(tmp_path):
    from taskserver.flows.ingest import ingest_documents

    inputs = tmp_path / "in"
    inputs.mkdir()
    pdf_factory.text_pdf(inputs / "good-one.pdf", pages=2, seed=1)
    pdf_factory.text_pdf(inputs / "good-two.pdf", pages=2, seed=2)
    pdf_factory.corrupt_pdf(inputs / "broken.pdf")
    out = tmp_path / "out"

    state: State = ingest_documents(inputs=str(inputs), output_dir=str(out), return_state=True)

    assert state.is_failed()
    assert "broken.pdf" in state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BatchFailedError)
    assert list(error.failures) == [str(inputs / "broken.pdf")]
    rows = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    sources = {row["source"] for row in rows}
    assert sources == {str(inputs / "good-one.pdf"), str(inputs / "good-two.pdf")}
    assert (out / "clusters" / "index").is_dir()
    assert search(str(out), "anything", k=1)  # the good part is usable


def test_rerun_writes_the_same_collection_without_duplicates(tmp_path):
    from taskserver.flows.ingest import ingest_documents

    inputs = tmp_path / "in"
    inputs.mkdir()
    pdf_factory.text_pdf(inputs / "a.pdf", pages=2, seed=3)
    first = ingest_documents(inputs=str(inputs), output_dir=str(tmp_path / "out"))
    before = (tmp_path / "out" / "chunks.jsonl").read_text()
    second = ingest_documents(inputs=str(inputs), output_dir=str(tmp_path / "out"))

    assert (tmp_path / "out" / "chunks.jsonl").read_text() == before
    assert second.chunks == first.chunks
    assert len(set(Collection(second.output_dir).chunks())) == second.chunks


def test_encrypted_pdfs_are_ingested_with_the_password_from_a_secret_block(tmp_path):
    from prefect.blocks.system import Secret

    from taskserver.flows.ingest import ingest_documents

    Secret(value="Ingest-Pw-5120").save("ingest-pdf-password", overwrite=True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    pdf_factory.encrypted_pdf(inputs / "locked.pdf", password="Ingest-Pw-5120", algorithm="RC4-128")
    pdf_factory.text_pdf(inputs / "open.pdf", pages=2, seed=11)

    summary = ingest_documents(
        inputs=str(inputs), output_dir=str(tmp_path / "out"), password_secrets={"locked.pdf": "ingest-pdf-password"}
    )

    assert summary.documents == 2 and summary.failures == {}
    sources = {row["source"] for row in Collection(summary.output_dir).chunks().values()}
    assert sources == {str(inputs / "locked.pdf"), str(inputs / "open.pdf")}
