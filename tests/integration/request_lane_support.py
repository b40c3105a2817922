"""Request-lane test pieces: a real drainer (or endpoint) process, and a small real classifier."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import os
from dataclasses import dataclass, field
from pathlib import Path

from platform_support import base_env, wait_until, _stop
from taskserver.platform.request_lane import DRAINER_MODULE, ENDPOINT_MODULE

DRAINER, ENDPOINT = DRAINER_MODULE, ENDPOINT_MODULE


@dataclass
class LaneProcess:
    """``python -m MODULE`` with the lane's database and settings in its environment."""

    module: str
    database_url: str
    log: Path
    settings: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def start(self, ready: str | None = "draining") -> "LaneProcess":
        env = base_env(TASKSERVER_REQUEST_DATABASE_URL=self.database_url, **self.settings)
        if "PREFECT_API_URL" not in self.settings:
            env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen([sys.executable, "-m", self.module, *self.args], env=env,
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if ready:
            wait_until(lambda: ready in self.text() or self.process.poll() is not None, 180, f"{self.module} ready")
            assert self.process.poll() is None, self.text()
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def written(self) -> int:
        """Requests this drainer's batches wrote (its log's ``N written``): counts every completion."""
        return sum(int(n) for n in re.findall(r", (\d+) written", self.text()))

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


def make_classifier(model_dir: Path, labels=("cooking", "sports", "weather")) -> Path:
    """A real taskserver model directory: the bundled MiniLM with a fresh, seeded head (no training)."""
    import torch
    from transformers import AutoTokenizer

    from taskserver import inference

    torch.manual_seed(0)
    base = inference.default_base_model()
    model = inference.build_model(base, len(labels))
    return inference.save_model(model, AutoTokenizer.from_pretrained(base), model_dir, labels=list(labels),
                                base_model=base, max_length=64)
