"""The ``infer`` flow: classify texts (inline or a JSONL file) with a model from the ``train`` flow.

A thin wrapper over ``taskserver.inference``; the loaded model is cached per worker process.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import Field

from taskserver import encoding, inference, storage
from taskserver.errors import BatchFailedError, ParameterError
from taskserver.flows.forms import OptionalText, OptionalTexts
from taskserver.flows.heartbeats import heartbeat_hooks
from taskserver.flows.runtime import (
    file_fingerprint,
    markdown_table,
    publish_summary,
    publish_table,
    retry_transient_only,
    with_failure_note,
)
from taskserver.inference import Classifier, Prediction


@task(name="classify-texts", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient_only,
      cache_policy=NO_CACHE, persist_result=False)
def classify_texts(model_dir: str, texts: list[str], batch_size: int) -> list[Prediction]:
    return Classifier.load(model_dir).predict(texts, batch_size=batch_size)


@task(name="write-predictions", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient_only,
      cache_policy=NO_CACHE, persist_result=False)
def write_predictions(predictions: list[Prediction], ids: list[str], output_path: str) -> str:
    import json

    lines = [json.dumps({"id": i, "label": p.label, "probabilities": p.probabilities}) for i, p in zip(ids, predictions)]
    return storage.write_text(output_path, "\n".join(lines) + "\n")


@task(name="read-texts-to-classify", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient_only,
      cache_policy=NO_CACHE, persist_result=False)
def read_texts(input_path: str) -> list[tuple[str, str]]:
    return inference.read_input_texts(input_path)


def default_output(model_dir: str, input_path: str) -> str:
    """``outputs/predictions/<digest>.jsonl``: the same model and input always write the same file."""
    info = inference.inspect_model_dir(model_dir)
    marker = storage.join(info.model_dir, inference.MARKER_FILE)
    digest = hashlib.sha256((file_fingerprint(marker) + "|" + file_fingerprint(input_path)).encode())
    return f"outputs/predictions/{digest.hexdigest()[:20]}.jsonl"


@flow(name="infer", description="Batch text classification with a model trained by the train flow.",
      **with_failure_note(heartbeat_hooks()))
def infer(
    model_dir: str,
    texts: OptionalTexts = [],  # noqa: B006 - never mutated; [] renders as an empty list in the form
    input_path: OptionalText = "",
    output_path: OptionalText = "",
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64,
) -> dict[str, Any]:
    """Classify, write predictions, publish label counts; return counts (and predictions for inline texts).

    Args:
        model_dir: Required. A served location (the train flow's model_dir: its champion is used)
            or one run's model (the model folder inside a train run's output_dir).
        texts: The texts to classify, one per item. Type texts here, or give a file in input_path;
            typed texts are used instead of the deployment's sample file.
        input_path: JSONL with a 'text' (and optional 'id') per line; relative to the data dir.
            The deployments fill in samples:new-tickets.jsonl, six tickets shipped with taskserver.
        output_path: JSONL of id, label, probabilities. Empty: outputs/predictions/DIGEST.jsonl for
            a file, nothing written for typed texts.
        batch_size: Texts per forward pass, 1 to 4096.
    """
    started = time.perf_counter()
    texts, input_path = encoding.texts_or_file(texts, input_path)
    # Resolved once: a promotion during this run does not mix two models in one result.
    served = inference.inspect_model_dir(model_dir)  # a bad model directory fails before any work, by name
    if input_path is not None:
        rows = read_texts(input_path)
        ids, items = [r[0] for r in rows], [r[1] for r in rows]
        output_path = output_path or default_output(served.model_dir, input_path)
    else:
        items = list(texts or [])
        ids = [str(i) for i in range(len(items))]
        if not items:
            raise ParameterError("texts", "no texts to classify")
    # Empty or whitespace-only texts carry nothing to classify: named as failures, the rest go on.
    bad = encoding.check_texts(items, ids, input_path or "texts")
    if len(bad) == len(items):
        raise encoding.bad_texts_error(bad, len(items))
    bad_rows = {item.index for item in bad}
    ids = [i for row, i in enumerate(ids) if row not in bad_rows]
    items = [text for row, text in enumerate(items) if row not in bad_rows]
    # quote(): Prefect would otherwise walk every text and prediction, per task call.
    predictions = classify_texts(served.model_dir, quote(items), batch_size)
    location = write_predictions(quote(predictions), quote(ids), output_path) if output_path else None
    counts = inference.label_counts(predictions)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "model_dir": model_dir,
        "model_version": served.version,
        "count": len(predictions),
        "label_counts": counts,
        "output_path": location,
        "failed": {item.label: item.reason for item in bad},
        "seconds": round(seconds, 3),
    }
    if texts is not None:
        summary["predictions"] = [{"id": i, "label": p.label, "probabilities": p.probabilities}
                                  for i, p in zip(ids, predictions)]
    publish_table("infer-label-counts", [{"label": k, "count": v} for k, v in counts.items()],
                  "Predicted label counts")
    rows = [("model", f"`{model_dir}`" + (f" (champion {served.version})" if served.version else "")),
            ("texts", len(predictions)),
            ("output", f"`{location}`" if location else "-"),
            ("seconds", f"{seconds:.2f} ({len(predictions) / max(seconds, 1e-9):.0f} texts/s)")]
    publish_summary("infer-summary", "Inference",
                    markdown_table(["", "value"], rows) + "\n\n" +
                    markdown_table(["label", "count"], counts.items()))
    if bad:
        raise BatchFailedError.from_failures(summary["failed"], len(bad) + len(items), partial=summary)
    return summary
