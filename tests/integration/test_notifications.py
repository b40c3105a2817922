"""Webhook notifications set up by the bootstrap: idempotent, removable, and really delivered
by the server's automations to an HTTP endpoint when runs fail or chosen deployments complete.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from taskserver.cli import app
from taskserver.errors import ParameterError
from taskserver.platform.bootstrap import (
    NOTIFY_BLOCK, NOTIFY_COMPLETION_AUTOMATION, NOTIFY_FAILURE_AUTOMATION, ZOMBIE_AUTOMATION,
    Notifications, bootstrap, platform_state,
)
from taskserver.platform.submission import submit
from taskserver.platform.tasks import DIAGNOSTIC_TASKS
from taskserver.settings import reload_settings

from platform_support import probe_params, run, wait_until

SECRET_URL = "http://127.0.0.1:9/hook/s3cr3t-token"


async def _state() -> dict:
    async with get_client() as client:
        state = await platform_state(client)
        try:
            block = await client.read_block_document_by_name(NOTIFY_BLOCK, block_type_slug="webhook")
            state["block"] = (str(block.id), str(block.data.get("method")))
        except Exception:
            state["block"] = None
        return state


def _names(state: dict) -> list[str]:
    return [name for name, _ in state["automations"]]


def _bootstrap(notifications: Notifications):
    return bootstrap(extra_tasks=DIAGNOSTIC_TASKS, notifications=notifications)


@pytest.fixture
def notifications_off(prefect_server):
    """Whatever a test configured, the server ends without notification automations."""
    yield
    _bootstrap(Notifications())


def test_settings_read_env_and_cli_flags_override_them(monkeypatch):
    monkeypatch.setenv("TASKSERVER_NOTIFY_WEBHOOK_URL", SECRET_URL)
    monkeypatch.setenv("TASKSERVER_NOTIFY_COMPLETED", "encode/high, train/low")
    try:
        reload_settings()
        from_env = Notifications.from_settings()
        assert from_env.webhook_url == SECRET_URL
        assert from_env.completed == ["encode/high", "train/low"]
        assert "s3cr3t" not in repr(from_env) and "s3cr3t" not in repr(reload_settings())

        flags = Notifications.from_settings("https://hooks.example.com/other", ["probe/high"])
        assert (flags.webhook_url, flags.completed) == ("https://hooks.example.com/other", ["probe/high"])
    finally:
        monkeypatch.delenv("TASKSERVER_NOTIFY_WEBHOOK_URL")
        monkeypatch.delenv("TASKSERVER_NOTIFY_COMPLETED")
        reload_settings()


def test_bad_webhook_url_is_rejected_without_echoing_the_secret():
    with pytest.raises(ParameterError) as error:
        Notifications(webhook_url="ftp://files.example.com/s3cr3t")
    assert "notify webhook URL" in str(error.value) and "s3cr3t" not in str(error.value)


def test_second_bootstrap_with_a_webhook_changes_nothing(prefect_server, notifications_off):
    config = Notifications(webhook_url=SECRET_URL, completed=["probe/high"])
    first = _bootstrap(config)
    assert any(NOTIFY_FAILURE_AUTOMATION in c for c in first.changes), first.summary()
    assert any(NOTIFY_COMPLETION_AUTOMATION in c for c in first.changes), first.summary()
    assert "s3cr3t" not in first.summary()

    before = run(_state())
    second = _bootstrap(config)
    assert not second.changed, second.summary()
    assert run(_state()) == before
    for name in (ZOMBIE_AUTOMATION, NOTIFY_FAILURE_AUTOMATION, NOTIFY_COMPLETION_AUTOMATION):
        assert _names(before).count(name) == 1, name
    assert before["block"] is not None

    # A changed URL updates the block in place, and the automations keep pointing at it.
    moved = _bootstrap(Notifications(webhook_url="http://127.0.0.1:9/hook/other", completed=["probe/high"]))
    assert [c for c in moved.changes if "webhook block" in c] and not [c for c in moved.changes if "automation" in c]
    assert run(_state())["block"] == before["block"]


def test_removing_the_webhook_removes_the_notifications(prefect_server, notifications_off):
    _bootstrap(Notifications(webhook_url=SECRET_URL, completed=["probe/high"]))
    fewer = _bootstrap(Notifications(webhook_url=SECRET_URL))
    assert fewer.changes == [f"automation {NOTIFY_COMPLETION_AUTOMATION!r}: removed (not configured)"]

    off = _bootstrap(Notifications())
    assert off.changed
    state = run(_state())
    assert NOTIFY_FAILURE_AUTOMATION not in _names(state) and NOTIFY_COMPLETION_AUTOMATION not in _names(state)
    assert state["block"] is None
    assert ZOMBIE_AUTOMATION in _names(state)
    assert not _bootstrap(Notifications()).changed


def test_unknown_deployment_is_an_error_naming_it_and_changes_nothing(prefect_server, notifications_off):
    before = run(_state())
    with pytest.raises(ParameterError) as error:
        _bootstrap(Notifications(webhook_url=SECRET_URL, completed=["probe/high", "nope/high", "probe/urgent"]))
    assert "nope/high" in str(error.value) and "probe/urgent" in str(error.value)
    assert "'probe/high'" not in str(error.value).split("known:")[0]
    assert run(_state()) == before


async def _crash_an_ad_hoc_run(message: str) -> str:
    """A run with no deployment, crashed through the API as a lost worker's run would be."""
    from prefect.states import Crashed, Running

    from taskserver.flows.probe import probe

    async with get_client() as client:
        flow_run = await client.create_flow_run(probe, parameters={"label": "ad-hoc"})
        await client.set_flow_run_state(flow_run.id, Running(), force=True)
        await client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        return str(flow_run.id)


class _Recorder(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self.received.append({"path": self.path, "body": json.loads(body)})
        except ValueError:
            self.received.append({"path": self.path, "body": None, "raw": body.decode(errors="replace")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hook():
    """An HTTP endpoint on 127.0.0.1 that records every POST (parsed JSON body)."""
    handler = type("Recorder", (_Recorder,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler.received
    server.shutdown()
    server.server_close()


def test_webhook_receives_failed_runs_and_completed_runs_of_chosen_deployments(
    prefect_server, clean_queues, notifications_off, hook, start_worker, tmp_path,
):
    url, received = hook
    result = CliRunner().invoke(app, ["bootstrap", "--with-probe", "--notify-webhook", url,
                                      "--notify-completed", "probe/high"])
    assert result.exit_code == 0, result.output
    assert "/hook" not in result.output  # the URL is a secret: only scheme and host are shown

    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("the probe cannot make a directory here, so its run fails")
    records = tmp_path / "records"
    start_worker("cpu", slots=2)
    failed = str(submit("probe", "normal", probe_params("fails", not_a_dir, seconds=0), wait=True, timeout=60))
    ignored = str(submit("probe", "normal", probe_params("normal", records, seconds=0), wait=True, timeout=60))
    completed = str(submit("probe", "high", probe_params("high", records, seconds=0), wait=True, timeout=60))

    def post_for(run_id: str, state: str):
        return next((r["body"] for r in received
                     if r["body"] and r["body"]["flow_run"]["id"] == run_id and r["body"]["state"] == state), None)

    on_failure = wait_until(lambda: post_for(failed, "Failed"), timeout=60, what="the webhook POST for the failed run")
    assert on_failure["event"] == "prefect.flow-run.Failed"
    assert on_failure["deployment"] == "probe/normal" and on_failure["flow"] == "probe"
    assert on_failure["flow_run"]["name"] and on_failure["message"]

    on_completion = wait_until(lambda: post_for(completed, "Completed"), timeout=60,
                               what="the webhook POST for the completed probe/high run")
    assert on_completion["deployment"] == "probe/high"

    crashed = run(_crash_an_ad_hoc_run('worker lost: "node-3" evicted'))
    on_crash = wait_until(lambda: post_for(crashed, "Crashed"), timeout=60, what="the webhook POST for the crash")
    assert on_crash["deployment"] is None and on_crash["message"] == 'worker lost: "node-3" evicted'
    assert all(r["path"] == "/hook" and r["body"] is not None for r in received), received
    # probe/normal was not chosen: its completion (which happened first) is not announced.
    assert post_for(ignored, "Completed") is None
