"""The local stack's pid files: a pid is ours only while it is the very process that was started."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from taskserver.platform import localstack


def test_a_pid_file_names_its_process_until_it_exits_and_never_a_reused_pid(tmp_path):
    # Not a group leader (the stack's components are): _terminate stops the process alone.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "stack-marker"])
    try:
        localstack._write_pid(tmp_path / "x.pid", process.pid, "stack-marker")
        record = localstack._read_pid(tmp_path / "x.pid")
        assert localstack._ours(record)
        # The same pid with another start time is another process (the pid was reused).
        assert not localstack._ours({**record, "created": record["created"] - 30})
        assert not localstack._ours({**record, "marker": "some-other-command"})
        localstack._terminate(localstack._process(record))
        assert not localstack._ours(record)  # stopped, and reaped by _terminate's wait
    finally:
        process.kill()
    assert not localstack._ours({"pid": "not-a-pid"})


def test_stopping_a_component_stops_its_whole_process_group(tmp_path):
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              " time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", script, "stack-marker"], start_new_session=True)
    try:
        localstack._write_pid(tmp_path / "x.pid", leader.pid, "stack-marker")
        process = localstack._process(localstack._read_pid(tmp_path / "x.pid"))
        deadline = time.monotonic() + 30
        while not process.children() and time.monotonic() < deadline:  # the leader starts its child
            time.sleep(0.05)
        children = process.children()
        assert children, "the leader never started its child"
        localstack._terminate(process)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive and not process.is_running()
    finally:
        leader.kill()
