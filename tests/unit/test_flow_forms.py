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


def _schema(task):
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    return parameter_schema_from_entrypoint(task.entrypoint).model_dump_for_openapi()


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_no_parameter_renders_as_a_none_switch_or_breaks_its_description(task):
    """`X | None` shows a "str | None" switch; `<word>` in a description is eaten as an HTML tag."""
    for name, field in _schema(task)["properties"].items():
        assert {"type": "null"} not in field.get("anyOf", []), f"{task.name}.{name} offers a None switch"
        assert "<" not in field["description"] and ">" not in field["description"].replace("->", ""), \
            f"{task.name}.{name}: HTML-like text in {field['description']!r}"


def _bound_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_limits_the_ui_cannot_enforce_are_stated_in_the_description(task):
    """Prefect 3.8.8's form drops minimum/maximum, so the description says them."""
    for name, field in _schema(task)["properties"].items():
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in field:
                assert _bound_text(field[key]) in field["description"].replace(",", ""), \
                    f"{task.name}.{name}: {key} {field[key]} not stated in {field['description']!r}"


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_quick_run_either_asks_for_inputs_or_runs_on_shipped_samples(task):
    """The UI's Quick run opens the form when a parameter is required, else runs the defaults."""
    from taskserver import storage

    schema = _schema(task)
    defaults = {name: field.get("default") for name, field in schema["properties"].items()}
    defaults.update(dict(task.deployment_parameters))
    inputs = [defaults[name] for name in ("input_path", "data_path") if defaults.get(name)]
    assert schema.get("required") or inputs, f"{task.name}: Quick run has no required input and no sample to run on"
    for location in inputs:
        assert storage.exists(location), f"{task.name}: the default input {location} is not shipped"
