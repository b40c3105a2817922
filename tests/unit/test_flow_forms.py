"""Every catalogue flow renders a complete form in the Prefect UI: each parameter has a description."""

from __future__ import annotations

import importlib

import pytest
from prefect.utilities.callables import parameter_schema

from taskserver.platform.tasks import TASKS


def _load(entrypoint: str):
    path, name = entrypoint.split(":")
    module = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_every_parameter_has_a_description(task):
    flow = _load(task.entrypoint)
    assert flow.name == task.name
    schema = parameter_schema(flow.fn)
    missing = [name for name, field in schema.properties.items() if not field.get("description")]
    assert schema.properties, f"{task.name} takes no parameters"
    assert missing == [], f"{task.name}: parameters without a description in the UI form: {missing}"
