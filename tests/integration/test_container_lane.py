"""`taskserver up --containers`: job-lane runs in containers of the CPU image, through the real
prefect-docker worker against podman's Docker-compatible API (`podman system service`), with the
same pools, queues, priorities and data location as the process lane, and the same results.

Nothing is mocked: a real stack (embedded PostgreSQL, Prefect server, workers), a real podman
service, the CPU image with this tree's source (tests/charts/podman/Dockerfile.source).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from uuid import UUID

import numpy as np
import pdf_factory  # tests/ is on sys.path (conftest.py)
import pytest

from platform_support import BIN, REPO, base_env, free_port, read_starts, wait_until

TOOLS = REPO / ".tools" / "podman"
PODMAN_ENV = {"CONTAINERS_CONF": str(TOOLS / "containers.conf"), "CONTAINERS_STORAGE_CONF": str(TOOLS / "storage.conf")}
BASE_IMAGE = "localhost/taskserver-cpu:test"
LANE_IMAGE = "localhost/taskserver-cpu:container-lane"
"""BASE_IMAGE with this tree's src/: the container runs the code under test, never a stale copy."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (tests/charts/setup_podman.sh)"),
]


def _podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **PODMAN_ENV})


@pytest.fixture(scope="module")
def lane_image() -> str:
    # The image tests' CPU image, built only if missing (build-test.sh's lock: one build at a time).
    build = subprocess.run(["bash", str(REPO / "images" / "build-test.sh"), "cpu-image"], cwd=REPO,
                           capture_output=True, text=True, timeout=1700)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    source = _podman("build", "--quiet", "--layers", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                     "-f", str(REPO / "tests" / "charts" / "podman" / "Dockerfile.source"),
                     "-t", LANE_IMAGE, str(REPO / "src"))
    assert source.returncode == 0, source.stderr[-3000:]
    return LANE_IMAGE


def _cli(home: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess[str]:
    env = base_env(TASKSERVER_HOME=str(home), **PODMAN_ENV, **extra)
    for name in ("PREFECT_API_URL", "DOCKER_HOST"):
        env.pop(name, None)
    return subprocess.run([str(BIN / "taskserver"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _flow_run(url: str, run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            flow_run = await client.read_flow_run(UUID(run_id))
            pool = await client.read_work_pool(flow_run.work_pool_name)
            return flow_run, pool

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return asyncio.run(read())


def _containers_of(label_value: str) -> list[str]:
    listed = _podman("ps", "-a", "--filter", f"label=io.prefect.flow-run-id={label_value}", "--format", "{{.ID}}")
    return listed.stdout.split()


def test_container_lane_runs_encode_and_pdfs_in_the_image_like_the_process_lane(lane_image, tmp_path):
    from taskserver import documents, encoding

    home, data = tmp_path / "home", tmp_path / "data"
    inbox = data / "inbox"
    inbox.mkdir(parents=True)
    good = [pdf_factory.text_pdf(inbox / "alpha.pdf", pages=2, seed=1),
            pdf_factory.text_pdf(inbox / "beta.pdf", pages=3, seed=2)]
    pdf_factory.corrupt_pdf(inbox / "broken.pdf")
    texts = ["priority queues for ML work", "a container per run", "ünïcödé and emoji 🚀 survive"]
    port = free_port()
    env = {"TASKSERVER_DATA_DIR": str(data), "TASKSERVER_CONTAINER_IMAGE": lane_image}
    try:
        started = _cli(home, "up", "--containers", "--port", str(port), "--with-probe", "--warm-interpreters", "1", **env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "container lane: podman's Docker API on unix://" in started.stdout
        assert f"job-lane runs in containers of {lane_image}" in started.stdout
        url = f"http://127.0.0.1:{port}/api"

        encoded = _cli(home, "submit", "encode", "-p", "high", "--lane", "job", "--param", f"texts={json.dumps(texts)}",
                       "--param", "output=outputs/container.npz", "--param", "use_cache=false",
                       "--wait", "--timeout", "400", **env)
        assert encoded.returncode == 0, encoded.stdout + encoded.stderr
        pdfs = _cli(home, "submit", "process-pdfs", "-p", "low", "--param", "inputs=inbox",
                    "--param", "output_dir=chunks", "--param", "max_characters=400",
                    "--wait", "--timeout", "400", **env)
        assert pdfs.returncode != 0, pdfs.stdout + pdfs.stderr  # the corrupt file fails the run, by name

        encode_run, pool = _flow_run(url, encoded.stdout.splitlines()[0].strip())
        assert pool.type == "taskserver-container" and encode_run.work_pool_name == "cpu"
        assert encode_run.work_queue_name == "high" and encode_run.state.is_completed()
        # prefect-docker's infrastructure id: the engine's address and the container's id.
        assert re.fullmatch(r"http\+docker://localhost:[0-9a-f]{64}", encode_run.infrastructure_pid), \
            encode_run.infrastructure_pid
        pdf_run, _ = _flow_run(url, pdfs.stdout.splitlines()[0].strip())
        assert pdf_run.state.is_failed() and pdf_run.work_queue_name == "low"
        assert "broken.pdf: " in pdf_run.state.message and "damaged structure" in pdf_run.state.message
        assert "alpha.pdf" not in pdf_run.state.message
        # auto_remove: a finished run leaves no container behind.
        assert _containers_of(str(encode_run.id)) == [] and _containers_of(str(pdf_run.id)) == []

        # The same answers as the libraries give in this (host) process, which the process lane runs.
        saved = encoding.load_embeddings(str(data / "outputs" / "container.npz"))
        expected = encoding.encode_texts(texts, normalize=True)
        assert list(saved.ids) == list(expected.ids)
        np.testing.assert_allclose(saved.vectors, expected.vectors, rtol=0, atol=1e-5)
        for pdf in good:  # written by the container, into the mounted data location
            chunks = documents.load_chunks(str(data / "chunks" / f"{pdf.stem}.chunks.jsonl"))
            assert chunks == documents.process_pdf(pdf, max_characters=400).chunks
            assert (data / "chunks" / f"{pdf.stem}.chunks.jsonl").stat().st_uid == os.getuid()
        assert sorted(p.name for p in (data / "chunks").iterdir()) == [
            "alpha.chunks.jsonl", "alpha.elements.jsonl", "beta.chunks.jsonl", "beta.elements.jsonl"]

        # `down` stops a run's container that is still going, as it stops a process run.
        records = data / "records"
        records.mkdir()
        long = _cli(home, "submit", "probe", "-p", "normal", "--param", "label=long",
                    "--param", f"record_dir={records}", "--param", "seconds=600", **env)
        assert long.returncode == 0, long.stdout + long.stderr
        long_id = long.stdout.splitlines()[0].strip()
        wait_until(lambda: read_starts(records).get("long"), timeout=240, what="the long probe's body to start")
        assert len(_containers_of(long_id)) == 1
    finally:
        stopped = _cli(home, "down")
    assert "stopped container-api" in stopped.stdout, stopped.stdout + stopped.stderr
    assert f"stopped the container of run {long_id}" in stopped.stdout, stopped.stdout
    assert _containers_of(long_id) == []


def test_container_lane_refuses_clearly_without_an_engine_or_an_image(lane_image, tmp_path):
    home = tmp_path / "home"
    # The venv's bin alone on PATH: no podman, and DOCKER_HOST unset (_cli drops it).
    refused = _cli(home, "up", "--containers", "--port", str(free_port()), PATH=str(BIN))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "no container engine" in refused.stderr and "DOCKER_HOST" in refused.stderr

    missing = "localhost/taskserver-no-such-image:1"
    refused = _cli(home, "up", "--containers", "--port", str(free_port()), TASKSERVER_CONTAINER_IMAGE=missing)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"image {missing!r}" in refused.stderr and "never pulls" in refused.stderr
    # Nothing of the refused stack is left running.
    assert not list((home / "run").glob("*.pid"))
