"""A team's installed task type is recovered like a built-in one when its worker is lost.

The example package (examples/taskserver-keywords) is installed into a folder of its own and
bootstrapped into a server of this module's own (the bootstrap also creates the zombie
automation). One job-lane `extract-keywords` run reads 300,000 texts from a file (TF-IDF over all
of them takes a dozen seconds here), and its worker is SIGKILLed with the run's process while the
run is in its body. The zombie automation marks it Crashed after 90 s without heartbeats, the
recovery service reschedules it, a fresh worker completes it: once, with its output file whole.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

import pdf_factory
from fault_support import (
    RecoveryService, all_in, create_runs, job_lane_deployment, kill_like_a_lost_node, read_runs, state_types,
    wait_for, wait_for_heartbeats,
)
from platform_support import BIN, EXAMPLE_PACKAGE, base_env, install_example_package, prefect_server_on_postgres

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

TEXTS = 300_000
ZOMBIE_MESSAGE = "Flow run marked as crashed due to missing heartbeats."


def test_a_lost_worker_of_an_installed_task_loses_and_repeats_nothing(start_worker, tmp_path):
    site = install_example_package(tmp_path / "site-packages")
    env = {"PYTHONPATH": str(site)}
    base = [pdf_factory.paragraph(i, sentences=2) for i in range(20_000)]
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"{base[i % len(base)]} item{i}\n" for i in range(TEXTS)))
    output = tmp_path / "out" / "keywords.jsonl"

    with prefect_server_on_postgres(tmp_path / "server") as server:
        booted = subprocess.run([str(BIN / "taskserver"), "bootstrap"], env=base_env(PREFECT_API_URL=server.api_url, **env),
                                capture_output=True, text=True, timeout=300)
        assert booted.returncode == 0, booted.stdout + booted.stderr
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            deployment = job_lane_deployment("extract-keywords", "normal", "cpu")
            worker = start_worker("cpu", slots=1, api_url=server.api_url, env=env)
            [run_id] = create_runs(deployment, [{"input_path": str(source), "output": str(output), "top": 3}])
            wait_for(lambda: all_in([run_id], {"RUNNING", "COMPLETED", "FAILED", "CRASHED"}), timeout=300,
                     what="the run to be in its body", interval=0.3)
            wait_for_heartbeats([run_id])  # the zombie automation now watches it
            kill_like_a_lost_node(worker)
            assert state_types([run_id])[run_id] == "RUNNING", "the run was not mid-body when its worker was killed"
            assert not output.exists()

            recovery = RecoveryService(server.api_url, tmp_path / "recovery.log").start()
            try:
                start_worker("cpu", slots=1, api_url=server.api_url, env=env)
                wait_for(lambda: all_in([run_id], {"COMPLETED", "FAILED", "CANCELLED"}), timeout=600,
                         what="the run to finish after its worker was lost")
            finally:
                recovery.stop()

            run = read_runs([run_id])[run_id]
    assert run.state_type == "COMPLETED", f"{run.state_name}: {run.message}"
    assert run.count("COMPLETED") == 1, run.history
    assert run.messages("CRASHED") == [ZOMBIE_MESSAGE], run.history
    rescheduled = [m for kind, name, m in run.history if kind == "SCHEDULED" and name == "AwaitingRetry"]
    assert len(rescheduled) == 1 and rescheduled[0].startswith("Rescheduled by taskserver recovery"), run.history
    assert run.run_count == 2
    assert recovery.output().count("Rescheduled flow run") == 1

    # The output, written once and whole: every text's line, in order, with the library's answer.
    lines = output.read_text().splitlines()
    assert len(lines) == TEXTS
    assert [json.loads(lines[i])["id"] for i in (0, 1, TEXTS - 1)] == ["0", "1", str(TEXTS - 1)]  # a .txt line's id: its position
    assert sorted(p.name for p in output.parent.iterdir()) == ["keywords.jsonl"]  # no half-written file
    sys.path.insert(0, str(EXAMPLE_PACKAGE / "src"))
    try:
        from taskserver_keywords.keywords import top_keywords

        expected = top_keywords(source.read_text().splitlines(), 3)
    finally:
        sys.path.remove(str(EXAMPLE_PACKAGE / "src"))
    assert [json.loads(line)["keywords"] for line in lines[:1000]] == expected[:1000]
    assert json.loads(lines[-1])["keywords"] == expected[-1]
