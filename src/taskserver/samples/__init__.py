"""Small sample data shipped with the package, used by the demo: three PDFs and a labelled ticket set."""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent
PDF_DIR = SAMPLES_DIR / "pdfs"
TICKETS = SAMPLES_DIR / "tickets.jsonl"
"""144 support tickets labelled billing, technical or shipping (``text``, ``label``)."""
NEW_TICKETS = SAMPLES_DIR / "new-tickets.jsonl"
"""Six unlabelled tickets (``id``, ``text``) for the demo's inference step."""


SAMPLES_PREFIX = "samples:"
"""``samples:tickets.jsonl`` names a file shipped here, the same on every machine and image
(``taskserver.storage.resolve`` turns it into a path): what the forms' defaults point at."""
SAMPLE_TEXTS = SAMPLES_PREFIX + NEW_TICKETS.name
SAMPLE_TRAINING_SET = SAMPLES_PREFIX + TICKETS.name


def sample_pdfs() -> list[Path]:
    return sorted(PDF_DIR.glob("*.pdf"))
