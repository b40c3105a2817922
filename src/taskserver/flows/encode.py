"""The ``encode`` flow: texts (a list or a .jsonl/.csv/.txt file) to an embeddings file.

A thin wrapper over ``taskserver.encoding``: chunks for progress, the on-disk content cache,
an artifact with counts, cache hits and timings. Bad texts are named; the good ones are still saved.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import Field

from taskserver import encoding, storage
from taskserver.encoding import EmbeddingCache, Embeddings
from taskserver.errors import BatchFailedError, EncodingInputError, ParameterError
from taskserver.flows.forms import OptionalText, OptionalTexts, given
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver.flows.runtime import (
    Progress,
    file_fingerprint,
    markdown_table,
    publish_summary,
    retry_transient_only,
    with_failure_note,
)
from taskserver.settings import get_settings

CHUNK_SIZE = 4096
"""Texts per encode task: each finished chunk advances the progress artifact."""


@task(
    name="read-texts",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def read_input(input_path: str) -> tuple[list[str], list[Any]]:
    return encoding.read_texts(input_path)


@task(name="encode-chunk", retries=1, retry_condition_fn=retry_transient_only, cache_policy=NO_CACHE, persist_result=False)
def encode_chunk(
    texts: list[str], ids: list[str], normalize: bool, batch_size: int, use_cache: bool, source: str
) -> Embeddings:
    cache = EmbeddingCache() if use_cache else None
    return encoding.encode_texts(texts, ids, normalize=normalize, batch_size=batch_size, cache=cache, source=source)


@task(
    name="save-embeddings",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def save_output(embeddings: Embeddings, output: str) -> str:
    return encoding.save_embeddings(embeddings, output)


def default_output(texts: list[Any] | None, ids: list[str] | None, input_path: str | None, normalize: bool) -> str:
    """``outputs/embeddings/<digest>.npz``: the same input and options always write the same file."""
    digest = hashlib.sha256(f"{encoding.model_identity()}|normalize={normalize}".encode())
    if input_path is not None:
        digest.update(b"file:" + file_fingerprint(input_path).encode())
    else:
        for text in texts or []:
            encoded = str(text).encode("utf-8", "surrogatepass")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
        digest.update(b"ids:" + repr(ids).encode())
    return f"outputs/embeddings/{digest.hexdigest()[:20]}.npz"


def _encode_rows(items: list[Any], item_ids: list[str], rows: list[int], normalize: bool, batch_size: int,
                 use_cache: bool, source: str) -> Embeddings:
    """Embed ``items[rows]`` in chunks of ``CHUNK_SIZE`` (one task run each, with progress)."""
    progress = Progress(len(rows), "texts encoded") if len(rows) > CHUNK_SIZE else None
    parts: list[Embeddings] = []
    for start in range(0, len(rows), CHUNK_SIZE):
        chunk = rows[start : start + CHUNK_SIZE]
        # quote(): Prefect would otherwise walk every text of the chunk, per task call.
        part = encode_chunk(
            quote([items[row] for row in chunk]), quote([item_ids[row] for row in chunk]),
            normalize, batch_size, use_cache, source,
        )
        parts.append(part)
        if progress is not None:
            progress.advance(len(chunk), f"{part.cache_hits} from cache")
    return Embeddings(
        [item for part in parts for item in part.ids],
        np.concatenate([part.vectors for part in parts]) if len(parts) > 1 else parts[0].vectors,
        parts[0].model,
        normalize,
        sum(part.cache_hits for part in parts),
        sum(part.encoded for part in parts),
    )


@flow(name="encode", description="Texts to 384-dimensional embeddings with all-MiniLM-L6-v2.",
      **with_failure_note(heartbeat_hooks()))
def encode(
    texts: OptionalTexts = [],  # noqa: B006 - never mutated; [] renders as an empty list in the form
    input_path: OptionalText = "",
    ids: OptionalTexts = [],  # noqa: B006
    output: OptionalText = "",
    normalize: bool = True,
    batch_size: Annotated[int, Field(ge=0, le=4096)] = 0,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Embed texts, save them, and return a summary: count, dims, output, cache hits, failures.

    Bad texts (empty, whitespace-only) are named in the failed state; the good ones are still
    embedded and saved, and the summary rides on the error as ``partial``.

    Args:
        texts: The texts to embed, one per item. Type texts here, or give a file in input_path;
            typed texts are used instead of the deployment's sample file. For large inputs use a
            file, since parameters are stored with the flow run.
        input_path: A .jsonl (field 'text', optional 'id'), .csv (column 'text', optional 'id') or
            .txt (one text per line) file; relative paths are under the data dir. The deployments
            fill in samples:new-tickets.jsonl, six tickets shipped with taskserver.
        ids: One unique id per text in texts. Empty: the position (0, 1, ...).
        output: Where to write the .npz or .parquet file. Empty: outputs/embeddings/DIGEST.npz,
            named after the input and options.
        normalize: Scale every vector to unit length (for cosine search).
        batch_size: Texts per forward pass, 1 to 4096. 0: the configured default
            (TASKSERVER_EMBEDDING_BATCH_SIZE).
        use_cache: Serve texts embedded before from the content cache (cache/embeddings.sqlite in the data dir).
    """
    started = time.perf_counter()
    loads_before = encoding.encoder_loads()
    texts, input_path = encoding.texts_or_file(texts, input_path)
    ids = given(ids)
    if input_path is not None and ids is not None:
        raise ParameterError("ids", "ids come from the input file; give 'ids' only with 'texts'")
    batch_size = batch_size or get_settings().embedding_batch_size
    source = input_path if input_path is not None else "texts"

    if input_path is not None:
        item_ids, items = read_input(input_path)
    else:
        item_ids, items = ids, list(texts or [])
    read_seconds = time.perf_counter() - started
    if not items:
        raise EncodingInputError(source, "no texts to encode", "pass at least one non-empty string")
    item_ids = encoding.check_ids(item_ids, len(items), source)
    bad = encoding.check_texts(items, item_ids, source)
    if len(bad) == len(items):
        raise encoding.bad_texts_error(bad, len(items))
    bad_rows = {item.index for item in bad}
    good = [row for row in range(len(items)) if row not in bad_rows]
    output = output or default_output(items if input_path is None else None, ids, input_path, normalize)

    encode_started = time.perf_counter()
    embeddings = _encode_rows(items, item_ids, good, normalize, batch_size, use_cache, source)
    encode_seconds = time.perf_counter() - encode_started

    save_started = time.perf_counter()
    location = save_output(quote(embeddings), output)
    save_seconds = time.perf_counter() - save_started
    total_seconds = time.perf_counter() - started

    summary: dict[str, Any] = {
        "count": len(embeddings),
        "dims": embeddings.dims,
        "output": location,
        "cache_hits": embeddings.cache_hits,
        "encoded": embeddings.encoded,
        "failed": {item.label: item.reason for item in bad},
        "seconds": round(total_seconds, 3),
        # 0 when the process already had the model (a warm-lane interpreter, a cached call).
        "model_loads": encoding.encoder_loads() - loads_before,
    }
    _publish(summary, len(items), bad, read_seconds, encode_seconds, save_seconds, total_seconds)
    if bad:
        raise BatchFailedError.from_failures(summary["failed"], len(items), partial=summary)
    return summary


def _publish(
    summary: dict[str, Any],
    total: int,
    bad: list[encoding.BadText],
    read_seconds: float,
    encode_seconds: float,
    save_seconds: float,
    total_seconds: float,
) -> None:
    rate = summary["count"] / encode_seconds if encode_seconds > 0 else 0.0
    rows = [
        ("texts in", total),
        ("embedded", summary["count"]),
        ("from cache", summary["cache_hits"]),
        ("through the model", summary["encoded"]),
        ("failed", len(bad)),
        ("dimensions", summary["dims"]),
        ("output", f"`{storage.relative(summary['output'])}`"),
        ("read (s)", f"{read_seconds:.2f}"),
        ("encode (s)", f"{encode_seconds:.2f} ({rate:.0f} texts/s)"),
        ("save (s)", f"{save_seconds:.2f}"),
        ("total (s)", f"{total_seconds:.2f}"),
    ]
    markdown = markdown_table(["", "value"], rows)
    if bad:
        markdown += "\n\n## Failed texts\n\n" + markdown_table(
            ["text", "reason"], [(item.label, item.reason) for item in bad[:200]]
        )
        if len(bad) > 200:
            markdown += f"\n\n... and {len(bad) - 200} more."
    publish_summary("encode-summary", "Encode", markdown)
