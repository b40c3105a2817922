"""A throwaway Postgres cluster the fault tests can stop and start again, on a loopback port.

Like the ``postgres_url`` fixture of tests/integration, but it keeps the cluster's handle, so a
test can take the database away (``pg_ctl stop -m fast``) and bring it back on the same port.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
if str(INTEGRATION) not in sys.path:  # platform_support (servers, workers, wait_until)
    sys.path.insert(0, str(INTEGRATION))

from platform_support import free_port  # noqa: E402


def postgres_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@dataclass
class PostgresCluster:
    """initdb + pg_ctl as the postgres user (initdb refuses root), trust auth, 127.0.0.1 only."""

    bindir: Path
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="taskserver-pg-outage-")))
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/prefect"

    def _as_postgres(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def create(self) -> "PostgresCluster":
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        result = subprocess.run(self._as_postgres() + [str(self.bindir / "initdb"), "-D", str(self.data), "-U",
                                                       "prefect", "--auth=trust", "-E", "UTF8"],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"initdb failed: {result.stderr}")
        self.start()
        subprocess.run(self._as_postgres() + [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                              "-U", "prefect", "prefect"], check=True, capture_output=True)
        return self

    def start(self) -> None:
        subprocess.run(self._as_postgres() + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                              "-w", "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1",
                                              "start"], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(self._as_postgres() + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                              "-w", "stop"], check=True, capture_output=True)

    def destroy(self) -> None:
        subprocess.run(self._as_postgres() + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                              "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
