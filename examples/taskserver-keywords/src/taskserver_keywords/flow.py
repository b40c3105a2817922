"""The flow: a thin wrapper over the library, with taskserver's heartbeat hooks (so a lost
worker's run is found and rescheduled like any built-in task's)."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver_keywords.keywords import top_keywords


@flow(name="extract-keywords", description="The top TF-IDF keywords of each text.", **heartbeat_hooks())
def extract_keywords(texts: list[str], top: Annotated[int, Field(ge=1, le=50)] = 5) -> list[list[str]]:
    """Extract each text's keywords, weighted by TF-IDF over the batch.

    Args:
        texts: Required. The texts, each at least one word; one keyword list comes back per text.
        top: Keywords per text, 1 to 50.
    """
    return top_keywords(texts, top)
