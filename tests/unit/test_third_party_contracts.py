"""The private names of other projects that taskserver relies on, checked on the installed
versions: when an upgrade renames one, this fails with the name, instead of a warm worker or the
PDF flow failing at run time. Each entry says who relies on it and the version it was checked on.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest

CHECKED_ON = {"prefect": "3.8.8", "unstructured": "0.27.32", "prefect-docker": "0.7.4"}


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


def test_prefect_workers_still_propose_pending_in_the_hook_wakeup_waits_on():
    """platform.wakeup lets a poll start only once the last poll's runs were proposed Pending: it
    overrides ``_propose_pending_state(flow_run)`` and reads ``_submitting_flow_run_ids``, and relies
    on ``_submit_scheduled_flow_runs`` not awaiting before it returns (see the comment there)."""
    import inspect

    from prefect.workers.base import BaseWorker

    assert list(inspect.signature(BaseWorker._propose_pending_state).parameters) == ["self", "flow_run"]
    body = inspect.getsource(BaseWorker._submit_scheduled_flow_runs)
    assert "await " not in body and "start_soon(" in body and "self._submit_run" in body


def test_prefect_docker_keeps_the_job_variables_the_container_lane_sets():
    """platform.containers sets these defaults in the Docker worker's template, and fills these
    fields of its job configuration for each run."""
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    properties = DockerWorker.get_default_base_job_template()["variables"]["properties"]
    assert {"image", "image_pull_policy", "network_mode", "auto_remove", "volumes", "env"} <= set(properties)
    fields = DockerWorkerJobConfiguration.model_fields
    assert {"env", "volumes", "container_create_kwargs"} <= set(fields)


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
