"""``extract-keywords`` on the request lane: many small requests, one call per batch.

TF-IDF weights depend on the whole set of texts, so each request keeps its own: the batch
function runs the library once per request, in the drainer's already-loaded process. That still
saves a flow run per request (the lane's point); a task whose model call batches (an encoder)
would concatenate the texts instead, as taskserver's ``encode`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from taskserver.platform.request_lane.catalogue import RequestHandler
from taskserver_keywords.keywords import top_keywords


class KeywordsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(min_length=1, description="The texts; one keyword list comes back per text.")
    top: int = Field(default=5, ge=1, le=50, description="How many keywords per text.")


def keywords_batch(params: Sequence[KeywordsRequest]) -> list[dict[str, Any]]:
    return [{"keywords": top_keywords(p.texts, p.top)} for p in params]


HANDLER = RequestHandler(params=KeywordsRequest, batch=keywords_batch, size=lambda p: len(p.texts))
