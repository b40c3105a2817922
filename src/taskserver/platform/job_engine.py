"""``python -m taskserver.platform.job_engine``: Prefect's flow-run engine, minus its heartbeat thread.

What the local process lane's worker (``taskserver-process``) runs for each flow run instead of
``python -m prefect.engine``: exactly that module, run unmodified with ``runpy`` (as Prefect's
own workspace bootstrap runs it), inside a settings context without the engine's per-run
heartbeat thread, which costs ~1 s at the end of every run. The runs' heartbeats come from the
flows' own hooks (``taskserver.flows.heartbeats``), so the zombie automation still finds a run
whose process or worker is lost. The flow-run id comes from ``PREFECT__FLOW_RUN_ID``, as for
``prefect.engine``.
"""

from __future__ import annotations

import runpy
import shlex
import sys

COMMAND = shlex.join([sys.executable, "-m", "taskserver.platform.job_engine"])
"""The process worker's command; ``sys.executable`` is the worker's own interpreter."""


def main() -> None:
    from taskserver.flows.heartbeats import without_engine_heartbeats

    with without_engine_heartbeats():
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
