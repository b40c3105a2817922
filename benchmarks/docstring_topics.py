"""A 10-class text set built offline from the docstrings of installed libraries.

Each example is the summary paragraph of a public function's or class's docstring; its label is the
library it comes from. The ten libraries cover distinct domains (plotting, data frames, deep learning,
classical ML, symbolic maths, graphs, workflow orchestration, SQL databases, data validation,
scientific computing), so the label is the topic of the sentence. Library names and their usual
import aliases are masked so a classifier cannot just spot the name. Sources are read with ``ast``,
never imported; nothing is downloaded.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

LIBRARIES: dict[str, str] = {
    "matplotlib": "plotting",
    "pandas": "data frames",
    "torch": "deep learning",
    "sklearn": "classical machine learning",
    "sympy": "symbolic mathematics",
    "networkx": "graphs and networks",
    "prefect": "workflow orchestration",
    "sqlalchemy": "SQL databases",
    "pydantic": "data validation",
    "scipy": "scientific computing",
}
MASKED = (
    r"matplotlib|pyplot|mpl|plt|pandas|pd|torch|pytorch|sklearn|scikit-learn|scikit|sympy|networkx|nx"
    r"|prefect|sqlalchemy|sa|pydantic|scipy"
)
_MASK = re.compile(rf"(?<![\w-])({MASKED})(?![\w-])", re.IGNORECASE)


def _summary(docstring: str) -> str | None:
    paragraph = docstring.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    text = _MASK.sub("[lib]", text)
    if len(text) < 30 or text.startswith((">>>", "..", ":")):
        return None
    return text[:400]


def _docstrings(package_dir: Path, rng: random.Random, wanted: int) -> list[str]:
    files = sorted(p for p in package_dir.rglob("*.py") if "test" not in str(p.relative_to(package_dir)).lower())
    rng.shuffle(files)  # spread the sample over the whole package, not its first subpackage
    found: dict[str, None] = {}
    for file in files:
        try:
            tree = ast.parse(file.read_text("utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                text = _summary(doc) if doc else None
                if text:
                    found[text] = None
        if len(found) >= wanted:
            break
    return list(found)


def build(per_class: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """Balanced rows {text, label}; texts that occur under two libraries are dropped as ambiguous."""
    site = Path(sysconfig.get_paths()["purelib"])
    rng = random.Random(seed)
    pools = {lib: _docstrings(site / lib, rng, wanted=per_class * 3) for lib in LIBRARIES}
    seen: dict[str, int] = {}
    for texts in pools.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    rows = []
    for lib, texts in pools.items():
        unique = [t for t in texts if seen[t] == 1]
        if len(unique) < per_class:
            raise RuntimeError(f"{lib}: only {len(unique)} usable docstrings, need {per_class}")
        rows += [{"text": t, "label": lib} for t in rng.sample(unique, per_class)]
    rng.shuffle(rows)
    return rows


def split(rows: list[dict[str, str]], seed: int = 0, validation: float = 0.1, test: float = 0.2):
    """Stratified train / validation / test lists."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    parts: tuple[list, list, list] = ([], [], [])
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_test, n_val = round(len(group) * test), round(len(group) * validation)
        parts[2].extend(group[:n_test])
        parts[1].extend(group[n_test:n_test + n_val])
        parts[0].extend(group[n_test + n_val:])
    for part in parts:
        rng.shuffle(part)
    return parts


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    return path


if __name__ == "__main__":
    import collections
    import time

    started = time.perf_counter()
    rows = build()
    print(len(rows), collections.Counter(r["label"] for r in rows), f"{time.perf_counter() - started:.1f}s")
    for row in rows[:12]:
        print(row["label"], "|", row["text"][:150])
