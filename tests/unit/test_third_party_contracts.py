"""The private names of other projects that taskserver relies on, checked on the installed
versions: when an upgrade renames one, this fails with the name, instead of a warm worker or the
PDF flow failing at run time. Each entry says who relies on it and the version it was checked on.
"""

from __future__ import annotations

import importlib.metadata

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
