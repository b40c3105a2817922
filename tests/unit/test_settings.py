"""Every taskserver setting lives in the one Settings model, and get_settings() follows the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskserver.platform.bootstrap import Limits
from taskserver.platform.deployments import code_dir
from taskserver.settings import Settings, env_name, get_settings

SRC = Path(__file__).resolve().parents[2] / "src" / "taskserver"
# Not settings: a prefix of the training launcher's progress lines on stdout, and the pid a warm
# worker hands its own interpreters (a handshake between two of our processes, never set by a user).
NOT_SETTINGS = {"TASKSERVER_PROGRESS", "TASKSERVER_WARM_WORKER_PID"}


def test_every_taskserver_variable_named_in_the_code_is_a_settings_field() -> None:
    fields = {env_name(name) for name in Settings.model_fields}
    named: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        # A whole name only: ``TASKSERVER_NOTIFY_*`` in a docstring is a wildcard, not a variable.
        for name in re.findall(r"\bTASKSERVER_[A-Z0-9_]*[A-Z0-9]\b(?!_?\*)", path.read_text()):
            named.setdefault(name, set()).add(str(path.relative_to(SRC)))
    assert named, "the scan found no variable at all: the pattern is broken"
    stray = {name: sorted(where) for name, where in named.items() if name not in fields | NOT_SETTINGS}
    assert not stray, f"read outside Settings (add a field to taskserver/settings.py): {stray}"


def test_no_module_reads_a_taskserver_variable_from_the_environment_directly() -> None:
    direct = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']TASKSERVER_""")
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if direct.search(p.read_text())]
    assert offenders == []


def test_get_settings_follows_the_environment_without_a_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name("warm_max_runs"), "7")
    assert get_settings().warm_max_runs == 7
    monkeypatch.setenv(env_name("warm_max_runs"), "9")
    assert get_settings().warm_max_runs == 9
    monkeypatch.delenv(env_name("warm_max_runs"))
    assert get_settings().warm_max_runs == Settings.model_fields["warm_max_runs"].default
    assert get_settings() is get_settings(), "an unchanged environment is parsed once"


def test_limits_and_code_dir_come_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(env_name("pool_limits"), "cpu=3, gpu=none")
    monkeypatch.setenv(env_name("queue_limits"), "cpu/low=1")
    assert Limits.from_env() == Limits(pool={"cpu": 3, "gpu": None}, queue={"cpu/low": 1})
    monkeypatch.setenv(env_name("code_dir"), str(tmp_path))
    assert code_dir() == tmp_path.resolve()


def test_a_bad_limit_in_the_environment_names_the_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name("pool_limits"), "cpu=lots")
    with pytest.raises(Exception, match="cpu=lots"):
        Limits.from_env()
