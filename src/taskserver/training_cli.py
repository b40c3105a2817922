"""Entry point for each process of ``accelerate launch``: ``python -m taskserver.training_cli``.

Reads a TrainConfig JSON, trains, prints progress as ``TASKSERVER_PROGRESS {json}`` lines for the
parent to parse, and writes the result (or the error, with its class) to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from taskserver import storage
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--result", required=True, help="where the main process writes the outcome")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with open(args.config, encoding="utf-8") as handle:
        config = TrainConfig.model_validate_json(handle.read())

    # Not PartialState(): created before the Accelerator, it would ignore ACCELERATE_USE_CPU and
    # pin every process to a non-distributed state.
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train_classifier(config, on_progress=_print_progress)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then re-raised
        if is_main:
            storage.write_text(args.result, json.dumps({"error": describe_error(exc)}))
        if isinstance(exc, TrainingInterrupted):
            return 143
        raise
    if is_main:
        storage.write_text(args.result, json.dumps({"result": result.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
