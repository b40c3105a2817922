"""The flow: a thin wrapper over the library, with taskserver's heartbeat hooks (so a lost
worker's run is found and rescheduled like any built-in task's)."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from taskserver.errors import ParameterError
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver_keywords.keywords import keywords_of_file, top_keywords


@flow(name="extract-keywords", description="The top TF-IDF keywords of each text.", **heartbeat_hooks())
def extract_keywords(
    texts: list[str] | None = None,
    top: Annotated[int, Field(ge=1, le=50)] = 5,
    input_path: str = "",
    output: str = "",
) -> list[list[str]] | str:
    """Extract each text's keywords, weighted by TF-IDF over all the texts of the run.

    Args:
        texts: The texts, each at least one word; one keyword list comes back per text.
            Or give a file in input_path instead.
        top: Keywords per text, 1 to 50.
        input_path: A .jsonl (field 'text', optional 'id'), .csv or .txt (a text per line) under
            the data location; needs output.
        output: Where the keywords of input_path's texts go, as JSON lines {"id", "keywords"};
            the run returns this location.
    """
    if bool(input_path) != bool(output):
        raise ParameterError("input_path/output", "input_path and output go together",
                             "give both (a file in, a file out), or neither and the texts")
    if input_path:
        if texts:
            raise ParameterError("texts/input_path", "both texts and input_path are given",
                                 "give the texts, or a file in input_path, not both")
        keywords_of_file(input_path, output, top)
        return output
    return top_keywords(texts or [], top)
