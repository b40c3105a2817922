"""Semantic search over an ingested collection: embed the query, ask the neighbour index.

Reads what the ``ingest-documents`` pipeline writes: ``chunks.jsonl`` (chunk text and
metadata) and ``clusters/index`` (the faiss index over the chunk embeddings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from taskserver import clustering, encoding, storage
from taskserver.errors import InvalidInputError


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    score: float
    text: str
    source: str
    pages: list[int]


@dataclass(frozen=True)
class Collection:
    """The output directory of one ``ingest-documents`` run."""

    location: str

    @property
    def chunks_location(self) -> str:
        return storage.join(self.location, "chunks.jsonl")

    @property
    def embeddings_location(self) -> str:
        return storage.join(self.location, "embeddings.npz")

    @property
    def clusters_location(self) -> str:
        return storage.join(self.location, "clusters")

    @property
    def index_location(self) -> str:
        return storage.join(self.clusters_location, "index")

    def chunks(self) -> dict[str, dict]:
        if not storage.exists(self.chunks_location):
            raise InvalidInputError(self.location, "no chunks.jsonl: not the output of an ingest-documents run")
        rows = (json.loads(line) for line in storage.read_bytes(self.chunks_location).decode().splitlines() if line)
        return {row["id"]: row for row in rows}


def search(collection: str, query: str, k: int = 3) -> list[Hit]:
    """The ``k`` chunks closest in meaning to ``query``, best first."""
    if not isinstance(query, str) or not query.strip():
        raise InvalidInputError("query", "empty query")
    target = Collection(storage.resolve(collection))
    chunks = target.chunks()
    index = clustering.NeighbourIndex.load(target.index_location)
    vector = encoding.encode_texts([query], normalize=True, source="query").vectors
    hits = []
    for chunk_id, score in index.search(vector, k=min(k, len(index)))[0]:
        row = chunks[chunk_id]
        hits.append(Hit(chunk_id, float(score), row["text"], row.get("source", ""), list(row.get("pages", []))))
    return hits
