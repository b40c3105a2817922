"""Every ``python -m`` entry point parses its command line the same way (taskserver.commands)."""

from __future__ import annotations

import pytest

from taskserver import commands, training_cli
from taskserver.platform import recovery, worker
from taskserver.platform.request_lane import drainer, http

ENTRY_POINTS = {"worker": worker.main, "recovery": recovery.main, "drainer": drainer.main,
                "http": http.main, "training": training_cli.main}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_exits_zero_and_an_unknown_option_is_a_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    ENTRY_POINTS[name](["--help"])  # prints the usage; nothing runs
    assert "Usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        ENTRY_POINTS[name](["--no-such-option"])
    assert exited.value.code == 2
    assert "No such option: --no-such-option" in capsys.readouterr().err


def test_a_bad_value_names_the_option_and_a_good_one_reaches_the_function(capsys: pytest.CaptureFixture[str]) -> None:
    def command(limit: int = 1) -> int:
        return limit * 2

    assert commands.run(command, ["--limit", "21"]) == 42
    with pytest.raises(SystemExit) as exited:
        commands.run(command, ["--limit", "many"])
    assert exited.value.code == 2 and "--limit" in capsys.readouterr().err


def test_the_worker_refuses_a_limit_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        worker.main(["cpu", "0"])
    assert exited.value.code == 2 and "limit" in capsys.readouterr().err.lower()
