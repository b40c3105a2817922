"""Champion and challenger: the stable model location that ``infer`` reads, and what may replace it.

A location (``model_dir``) holds ``versions/v0001``, ``versions/v0002``, ... (each a complete model
plus ``lineage.json``), ``champion.json`` naming the version served, and ``history.jsonl`` with one
line per decision. A challenger becomes a new version only if it beats the champion on the same
validation rows by the margin; the pointer is then replaced atomically, so a reader loads the old
champion or the new one, never half of either. Versions are kept, so a restore is a pointer write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskserver import storage
from taskserver.errors import ModelRegistryError
from taskserver.inference import CHAMPION_FILE, VERSIONS_DIR, champion_version, inspect_model_dir
from taskserver.training import Example

LINEAGE_FILE = "lineage.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
VERSION_PREFIX = "v"


@dataclass(frozen=True)
class Decision:
    """Whether a challenger replaced the champion, and why, with both scores on the same rows."""

    promoted: bool
    reason: str
    margin: float
    challenger_macro_f1: float
    champion_macro_f1: float | None
    champion: str | None
    """The version served after the decision."""
    previous: str | None
    """The champion it replaced (kept: ``taskserver model restore`` brings it back)."""
    validation_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _root(model_dir: str | os.PathLike[str]) -> Path:
    location = storage.resolve(os.fspath(model_dir))
    if storage.is_url(location) and not location.startswith("file://"):
        raise ModelRegistryError(str(model_dir), "a model registry must be a filesystem path (it is switched"
                                 " with an atomic rename)", "use a local or mounted directory")
    return Path(location.removeprefix("file://"))


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One promotion or restore at a time per location (readers never wait)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pointer(root: Path) -> dict[str, Any]:
    version = champion_version(root)  # raises ModelDirectoryError on an unreadable pointer
    return json.loads((root / CHAMPION_FILE).read_text("utf-8")) if version else {}


def _point(root: Path, version: str, previous: str | None, reason: str) -> None:
    pointer = {"version": version, "previous": previous, "reason": reason, "updated_at": time.time()}
    storage.write_text(str(root / CHAMPION_FILE), json.dumps(pointer, indent=2))  # temp file + os.replace


def _log(root: Path, event: dict[str, Any]) -> None:
    with open(root / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"at": time.time(), **event}, default=str) + "\n")


def versions(model_dir: str | os.PathLike[str]) -> list[str]:
    """The complete versions kept at ``model_dir``, oldest first (a staging directory is not one)."""
    folder = _root(model_dir) / VERSIONS_DIR
    found = [p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(VERSION_PREFIX)] \
        if folder.is_dir() else []
    return sorted(found, key=lambda name: int(name[len(VERSION_PREFIX):]))


def macro_f1(model: str | os.PathLike[str], examples: Sequence[Example], source: str) -> float:
    """Macro-F1 of the model at ``model`` (a model directory or a registry's champion) on ``examples``."""
    from sklearn.metrics import f1_score

    from taskserver.inference import Classifier

    classifier = Classifier.load(model)
    unknown = sorted({row.label for row in examples} - set(classifier.labels))
    if unknown:
        raise ModelRegistryError(
            source, f"validation labels the model at {model} does not know: {', '.join(map(repr, unknown))}",
            f"validate on rows labelled with its labels ({', '.join(classifier.labels)})",
        )
    if not examples:
        raise ModelRegistryError(source, "no validation rows to compare the models on")
    predicted = [p.label for p in classifier.predict([row.text for row in examples])]
    return float(f1_score([row.label for row in examples], predicted, average="macro", zero_division=0))


def check_challenger_labels(model_dir: str | os.PathLike[str], labels: Sequence[str], source: str) -> None:
    """Fail (before any training) when the champion at ``model_dir`` was trained on other labels."""
    root = _root(model_dir)
    if not root.is_dir() or champion_version(root) is None:
        return
    champion = inspect_model_dir(root)
    if sorted(champion.labels) != sorted(labels):
        raise ModelRegistryError(
            source,
            f"labels ({', '.join(sorted(labels))}) differ from those of the champion {champion.version} at"
            f" {model_dir} ({', '.join(sorted(champion.labels))}): the two cannot be compared",
            "train on the champion's labels, or promote into a new model_dir",
        )


def promote(
    challenger_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    validation: Sequence[Example],
    *,
    margin: float,
    lineage: dict[str, Any],
    validation_source: str = "validation rows",
) -> Decision:
    """Make the challenger the champion if its macro-F1 on ``validation`` beats the champion's by
    ``margin`` or more (and by more than nothing); with no champion yet, it becomes the first."""
    if margin < 0:
        raise ModelRegistryError("promotion_margin", f"must be 0 or more, got {margin}")
    root = _root(model_dir)
    challenger = inspect_model_dir(challenger_dir)
    with _locked(root):
        current = champion_version(root)
        check_challenger_labels(root, challenger.labels, str(challenger_dir))
        ours = macro_f1(challenger.model_dir, validation, validation_source)
        theirs = macro_f1(root, validation, validation_source) if current else None
        gain = None if theirs is None else round(ours - theirs, 6)
        if gain is None:
            reason = "no champion yet: the first model becomes the champion"
        elif gain > 0 and gain >= margin:
            reason = f"macro-F1 {ours:.4f} beats the champion's {theirs:.4f} by {gain:+.4f} (margin {margin})"
        else:
            reason = (f"macro-F1 {ours:.4f} vs the champion's {theirs:.4f} ({gain:+.4f}) does not beat it by the"
                      f" margin {margin}: {current} stays the champion")
        promoted = gain is None or (gain > 0 and gain >= margin)
        served = _next_version(root) if promoted else current
        decision = Decision(promoted, reason, margin, ours, theirs, served, current if promoted else None,
                            len(validation))
        if promoted:
            _add_version(root, challenger.model_dir, str(served), {**lineage, "decision": decision.to_dict()})
            _point(root, str(served), previous=current, reason=reason)
        _log(root, {"event": "promoted" if promoted else "kept", "challenger": str(challenger_dir),
                    "run_id": lineage.get("run_id"), **decision.to_dict()})
        return decision


def _next_version(root: Path) -> str:
    existing = versions(root)
    return f"{VERSION_PREFIX}{int(existing[-1][len(VERSION_PREFIX):]) + 1 if existing else 1:04d}"


def _add_version(root: Path, source: str, version: str, lineage: dict[str, Any]) -> None:
    """Copy a model in with its lineage; it appears under its version name only once complete."""
    folder = root / VERSIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".incoming-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, staging)
        storage.write_text(str(staging / LINEAGE_FILE), json.dumps(lineage, indent=2, default=str))
        os.rename(staging, folder / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def restore(model_dir: str | os.PathLike[str], version: str | None = None) -> tuple[str, str]:
    """Serve ``version`` (default: the champion before the current one) again; returns (from, to).

    The champion it replaces becomes the previous one, so a second restore undoes the first."""
    root = _root(model_dir)
    with _locked(root):
        pointer = _pointer(root)
        current = pointer.get("version")
        if current is None:
            raise ModelRegistryError(str(model_dir), "no champion here, so nothing to restore",
                                     "train with model_dir set to this location first")
        target = version or pointer.get("previous")
        if not target:
            raise ModelRegistryError(str(model_dir), f"{current} is the only champion it has had",
                                     f"name a version to serve; kept: {', '.join(versions(root))}")
        if target not in versions(root):
            raise ModelRegistryError(str(model_dir), f"no version {target!r}",
                                     f"choose one of: {', '.join(versions(root))}")
        inspect_model_dir(root / VERSIONS_DIR / target)  # a damaged version is refused, by name
        _point(root, target, previous=current, reason=f"restored by hand, replacing {current}")
        _log(root, {"event": "restored", "champion": target, "previous": current})
        return current, target


def describe(model_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every kept version with its lineage (run, data, metrics), the champion marked."""
    root = _root(model_dir)
    current = champion_version(root) if root.is_dir() else None
    rows = []
    for name in versions(root):
        try:
            lineage = json.loads((root / VERSIONS_DIR / name / LINEAGE_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            lineage = {}
        rows.append({"version": name, "champion": name == current, **lineage})
    return rows
