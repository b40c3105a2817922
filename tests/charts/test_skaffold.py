"""skaffold.yaml against skaffold's own v4beta14 schema (no skaffold binary can be installed)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# skaffold's published v4beta14 schema (Apache-2.0), vendored so the check never depends on where
# the checkout sits.
SCHEMA = Path(__file__).resolve().parent / "schemas" / "skaffold-v4beta14.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "skaffold.yaml").read_text())


def test_skaffold_yaml_validates_against_the_v4beta14_schema(config) -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(config)]
    assert not errors, "\n".join(errors)


def test_skaffold_builds_both_images_from_their_dockerfiles(config) -> None:
    built = {artifact["image"]: artifact["docker"]["dockerfile"] for artifact in config["build"]["artifacts"]}
    assert built == {"taskserver-cpu": "images/Dockerfile.cpu", "taskserver-gpu": "images/Dockerfile.gpu"}
    for dockerfile in built.values():
        assert (REPO / dockerfile).exists()


def test_skaffold_deploys_the_chart_with_local_and_gpu_profiles(config) -> None:
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO / release["chartPath"] / "Chart.yaml").exists()
    assert {profile["name"] for profile in config["profiles"]} == {"local", "gpu", "task-package"}
    for profile in config["profiles"]:
        for patch in profile["patches"]:
            for values_file in patch["value"] if patch["path"].endswith("valuesFiles") else []:
                assert (REPO / values_file).exists(), values_file


def test_the_task_package_profile_builds_the_example_from_the_cpu_image_and_deploys_it(config) -> None:
    """The profile's patches, applied as skaffold applies JSON patches, give a third artifact built
    FROM the cpu artifact, and the chart's cpu image is that artifact."""
    import copy

    import jsonpatch

    (profile,) = [p for p in config["profiles"] if p["name"] == "task-package"]
    patched = jsonpatch.apply_patch(copy.deepcopy(config), profile["patches"])
    artifact = patched["build"]["artifacts"][-1]
    assert artifact["image"] == "taskserver-cpu-keywords"
    assert (REPO / artifact["context"] / artifact["docker"]["dockerfile"]).exists()
    assert artifact["requires"] == [{"image": "taskserver-cpu", "alias": "BASE"}]
    assert "ARG BASE_IMAGE" in (REPO / artifact["context"] / "Dockerfile").read_text()
    values = patched["deploy"]["helm"]["releases"][0]["setValueTemplates"]
    assert values["images.cpu.repository"] == "{{.IMAGE_REPO_taskserver_cpu_keywords}}"
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    assert not list(validator.iter_errors(patched))
