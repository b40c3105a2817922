"""Small labelled text the tests make themselves: three topics a few training steps can learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "sports": ["the team won the match", "a late goal in the final minute", "the striker scored twice",
               "the coach praised the players", "fans cheered at the stadium", "the referee blew the whistle"],
    "weather": ["heavy rain is expected tomorrow", "a sunny and warm afternoon", "strong winds and snow tonight",
                "the forecast says cloudy skies", "temperatures will drop below zero", "a storm is coming"],
    "cooking": ["bake the bread for forty minutes", "add salt and pepper to the soup", "chop the onions finely",
                "stir the sauce until it thickens", "the recipe needs two eggs", "fry the garlic in olive oil"],
}


def topic_rows(per_class: int, seed: int) -> list[dict[str, str]]:
    """Short two-phrase sentences per topic, in topic order: a clear signal."""
    rng = random.Random(seed)
    return [{"text": ", and ".join(rng.sample(phrases, 2)), "label": label}
            for label, phrases in TOPICS.items() for _ in range(per_class)]


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    return path
