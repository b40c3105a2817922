"""The private names of other projects that taskserver relies on, checked on the installed
versions: when an upgrade renames one, this fails with the name, instead of a warm worker or the
PDF flow failing at run time. Each entry says who relies on it and the version it was checked on.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest

CHECKED_ON = {"prefect": "3.8.8", "unstructured": "0.27.32"}


@pytest.mark.parametrize("project", sorted(CHECKED_ON))
def test_the_installed_versions_are_the_ones_these_contracts_were_checked_on(project):
    assert importlib.metadata.version(project) == CHECKED_ON[project], (
        f"{project} is now {importlib.metadata.version(project)}: re-check the private names below, then update CHECKED_ON"
    )


def test_prefect_workers_keep_the_private_attributes_our_workers_read():
    """platform.warm (``_limit``, ``_logger``, ``_submitting_flow_run_ids``) and platform.wakeup /
    queue_order (``_work_pool_name``) read these off Prefect's BaseWorker after __init__."""
    from prefect.workers.process import ProcessWorker

    worker = ProcessWorker(work_pool_name="contract-check", limit=3)
    assert worker._limit == 3
    assert worker._work_pool_name == "contract-check"
    assert hasattr(worker._logger, "debug")
    assert isinstance(worker._submitting_flow_run_ids, set)


def test_unstructured_keeps_the_spacy_hooks_documents_replaces():
    """taskserver.documents points unstructured's spaCy loader at the packaged model (offline)."""
    from unstructured.nlp import tokenize

    assert callable(tokenize._load_spacy_model)
    assert callable(tokenize._get_nlp)
    assert isinstance(tokenize._SPACY_EXCLUDE, (list, tuple, set, frozenset))


def _installed_sources(*packages: str) -> str:
    import importlib.util
    from pathlib import Path

    texts = []
    for package in packages:
        root = Path(importlib.util.find_spec(package).origin).parent
        texts.extend(path.read_text(errors="replace") for path in root.rglob("*.py"))
    return "\n".join(texts)


def test_every_crash_message_recovery_matches_is_still_written_by_the_installed_prefect():
    """platform.recovery decides what to reschedule by the Crashed state's message. Each message
    (its literal stem: the exit code is formatted in) must still be in the installed Prefect or
    prefect-kubernetes source, so an upgrade that rewords one fails here, by message, instead of
    lost runs silently staying Crashed. The fault tests produce the real crashes for the common
    ones (a killed job-lane process, a lost warm worker, SIGTERM mid-training, a silent run)."""
    import re

    from taskserver.platform.recovery import LOST_INFRASTRUCTURE_MESSAGES, NEVER_RETRIED_PREFIXES

    ours = {"Flow run marked as crashed due to missing heartbeats."}  # bootstrap's zombie automation
    source = _installed_sources("prefect", "prefect_kubernetes")
    missing = []
    for message in (*LOST_INFRASTRUCTURE_MESSAGES, *NEVER_RETRIED_PREFIXES):
        if message in ours:
            continue
        stem = re.sub(r"\s*-?\d+$", "", message)  # "...status code -9" -> "...status code"
        if stem not in source:
            missing.append(message)
    assert not missing, f"no longer in the installed Prefect: {missing} (re-check platform.recovery)"


def test_the_zombie_automations_message_is_the_one_recovery_matches():
    from taskserver.platform.bootstrap import zombie_automation
    from taskserver.platform.recovery import LOST_INFRASTRUCTURE_MESSAGES

    assert LOST_INFRASTRUCTURE_MESSAGES[0] in json.dumps(zombie_automation().model_dump(mode="json"))
