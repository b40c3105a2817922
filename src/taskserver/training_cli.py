"""Entry point for each process of ``accelerate launch``: ``python -m taskserver.training_cli``.

Reads a TrainConfig JSON, trains, prints progress as ``TASKSERVER_PROGRESS {json}`` lines for the
parent to parse, and writes the result (or the error, with its class) to a JSON file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer

from taskserver import commands, storage
from taskserver.training import (
    PROGRESS_PREFIX,
    TrainConfig,
    TrainingInterrupted,
    TrainProgress,
    describe_error,
    train_classifier,
)


def _print_progress(event: TrainProgress) -> None:
    print(PROGRESS_PREFIX + json.dumps(event.to_dict()), flush=True)


def train(
    config_path: Annotated[str, typer.Option("--config", help="A file with the TrainConfig as JSON.")],
    result_path: Annotated[str, typer.Option("--result", help="Where the main process writes the outcome (a path or URL).")],
) -> int:
    """One process of ``accelerate launch``: train, print progress lines, write the outcome."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with open(config_path, encoding="utf-8") as handle:
        config = TrainConfig.model_validate_json(handle.read())

    # Not PartialState(): created before the Accelerator, it would ignore ACCELERATE_USE_CPU and
    # pin every process to a non-distributed state.
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        outcome = train_classifier(config, on_progress=_print_progress)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then re-raised
        if is_main:
            storage.write_text(result_path, json.dumps({"error": describe_error(exc)}))
        if isinstance(exc, TrainingInterrupted):
            return 143
        raise
    if is_main:
        storage.write_text(result_path, json.dumps({"result": outcome.to_dict()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return commands.run(train, argv, prog="python -m taskserver.training_cli")


if __name__ == "__main__":
    sys.exit(main())
