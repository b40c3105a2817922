"""The priority model and what is derived from it: queue order, PriorityClasses, limits, parameters."""

from __future__ import annotations

import pytest

from taskserver.errors import ParameterError
from taskserver.platform.bootstrap import DEFAULT_QUEUE_PRIORITY, Limits, zombie_automation
from taskserver.platform.priorities import PRIORITIES, PreemptionPolicy, get_priority
from taskserver.platform.submission import parse_params, validate_parameters


def test_queue_priorities_are_one_to_four_in_the_order_of_the_levels():
    assert [level.queue_priority for level in PRIORITIES] == [1, 2, 3, 4]
    assert [level.name for level in PRIORITIES] == ["critical", "high", "normal", "low"]


def test_priority_class_values_fall_as_queue_priority_numbers_rise():
    values = [level.class_value for level in PRIORITIES]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def test_critical_preempts_and_low_never_does():
    assert get_priority("critical").preemption_policy is PreemptionPolicy.PREEMPT_LOWER
    assert get_priority("low").preemption_policy is PreemptionPolicy.NEVER


def test_default_queue_is_served_after_low():
    assert DEFAULT_QUEUE_PRIORITY == max(level.queue_priority for level in PRIORITIES) + 1


def test_unknown_priority_names_the_choices():
    with pytest.raises(ParameterError, match="critical, high, normal, low"):
        get_priority("urgent")


def test_limits_parse_pool_and_queue_items():
    limits = Limits.parse(["cpu=4", "gpu=none"], ["gpu/low=1"])
    assert limits.pool == {"cpu": 4, "gpu": None} and limits.queue == {"gpu/low": 1}


@pytest.mark.parametrize("pool, queue", [(["tpu=1"], []), (["cpu=-1"], []), ([], ["cpu/urgent=1"]), (["cpu"], [])])
def test_limits_refuse_unknown_names_and_bad_numbers(pool, queue):
    with pytest.raises(ParameterError):
        Limits.parse(pool, queue)


def test_params_parse_as_json_when_they_parse_else_as_strings():
    assert parse_params(["n=3", "xs=[1, 2]", "name=alpha", "flag=true", "path=a/b.txt"]) == {
        "n": 3, "xs": [1, 2], "name": "alpha", "flag": True, "path": "a/b.txt"}
    with pytest.raises(ParameterError, match="KEY=VALUE"):
        parse_params(["novalue"])


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}, "required": ["n"]}


def test_parameters_are_checked_against_the_schema_with_names():
    validate_parameters({"n": 1}, SCHEMA, "x/low")
    with pytest.raises(ParameterError, match="bogus"):
        validate_parameters({"n": 1, "bogus": 2}, SCHEMA, "x/low")
    with pytest.raises(ParameterError, match="'n' is a required property"):
        validate_parameters({"s": "a"}, SCHEMA, "x/low")
    with pytest.raises(ParameterError, match="n: 'a' is not of type 'integer'"):
        validate_parameters({"n": "a"}, SCHEMA, "x/low")


def test_zombie_automation_crashes_runs_silent_for_ninety_seconds():
    automation = zombie_automation()
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 90
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert automation.actions[0].state.value == "CRASHED"
