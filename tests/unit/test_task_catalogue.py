"""Registering task types from other packages: the real loader over real entry points and real
modules (written to a temporary directory on sys.path); only the distribution metadata is left
out (an entry point made in the test has no distribution, so its package is its module's name)."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from taskserver.platform.registration import verify
from taskserver.platform.tasks import BUILTIN_TASKS, CPU_POOL, TASK_ENTRY_POINTS, TaskType, load_catalogue

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_SRC = REPO / "examples" / "taskserver-keywords" / "src"

BUILTIN = EntryPoint("builtin", "taskserver.platform.tasks:BUILTIN_TASKS", TASK_ENTRY_POINTS)


def _module(root: Path, name: str, body: str) -> None:
    path = root / f"{name.replace('.', '/')}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.write_text(textwrap.dedent(body))


def _task_module(root: Path, package: str, task_name: str, flow_name: str | None = None, pool: str = "CPU_POOL",
                 warm: bool = False, extra_import: str = "", request_handler: str = "") -> EntryPoint:
    _module(root, f"{package}.flow", f"""
        {extra_import}
        from prefect import flow

        @flow(name={flow_name or task_name!r})
        def run(texts: list[str], top: int = 3) -> int:
            \"\"\"A test task.

            Args:
                texts: Some texts.
            \"\"\"
            return len(texts)
    """)
    _module(root, f"{package}.registration", f"""
        from taskserver.platform.tasks import CPU_POOL, GPU_POOL, Pool, TaskType
        TASK = TaskType({task_name!r}, "{package}.flow.run", {pool}, "A test task.",
                        warm_capable={warm}, data_parameters=("texts",), request_handler={request_handler!r})
    """)
    return EntryPoint(package, f"{package}.registration:TASK", TASK_ENTRY_POINTS)


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root))  # for the fresh interpreter of the warm check
    return root


def test_the_built_in_tasks_come_through_the_same_entry_point_group():
    from taskserver.platform.tasks import catalogue

    installed = catalogue()
    assert [t.name for t in installed.tasks] == [t.name for t in BUILTIN_TASKS]
    assert {installed.package_of(t.name) for t in installed.tasks} == {"taskserver"}
    assert installed.problems == ()


def test_the_example_package_registers_a_warm_capable_task_that_verifies_clean(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE_SRC))
    found = load_catalogue([BUILTIN, EntryPoint("keywords", "taskserver_keywords:TASK", TASK_ENTRY_POINTS)])
    assert found.problems == ()
    assert [t.name for t in found.tasks][-1] == "extract-keywords"
    assert found.package_of("extract-keywords") == "taskserver_keywords"
    assert found.by_name()["extract-keywords"].lanes == ("warm", "job")
    report = verify(found, REPO)
    assert report.problems == [] and report.warnings == []


def test_each_task_names_the_module_its_flow_lives_in_for_either_entrypoint_form():
    modules = {t.name: t.module for t in BUILTIN_TASKS}
    assert modules["encode"] == "taskserver.flows.encode"
    assert modules["process-pdfs"] == "taskserver.flows.pdfs"
    keywords = TaskType("extract-keywords", "taskserver_keywords.flow.extract_keywords", CPU_POOL, "d")
    assert keywords.module == "taskserver_keywords.flow"


def test_a_name_clash_is_refused_naming_both_packages(site):
    found = load_catalogue([BUILTIN, _task_module(site, "teamclash", "encode")])
    assert [t.name for t in found.tasks] == [t.name for t in BUILTIN_TASKS]
    [problem] = found.problems
    assert "package 'teamclash'" in problem and "'encode' is already registered by package 'taskserver'" in problem


def test_the_diagnostic_probe_name_is_taken_too(site):
    found = load_catalogue([BUILTIN, _task_module(site, "teamprobe", "probe")])
    assert "already registered by taskserver (a diagnostic task)" in found.problems[0]


def test_an_entry_point_that_does_not_import_names_the_package_and_the_error(site):
    _module(site, "teambroken.registration", "import not_installed_anywhere\n")
    found = load_catalogue([BUILTIN, EntryPoint("broken", "teambroken.registration:TASK", TASK_ENTRY_POINTS)])
    [problem] = found.problems
    assert problem.startswith("package 'teambroken': its entry point broken = teambroken.registration:TASK does not import")
    assert "No module named 'not_installed_anywhere'" in problem
    assert len(found.tasks) == len(BUILTIN_TASKS)


def test_an_entry_point_naming_something_else_is_refused(site):
    _module(site, "teamwrong.registration", "TASK = {'name': 'summarize'}\n")
    found = load_catalogue([BUILTIN, EntryPoint("wrong", "teamwrong.registration:TASK", TASK_ENTRY_POINTS)])
    assert "names dict, not a TaskType" in found.problems[0]


def test_a_pool_that_does_not_exist_is_refused(site):
    entry = _task_module(site, "teampool", "summarize", pool='Pool("tpu", "TPUs")')
    found = load_catalogue([BUILTIN, entry])
    assert "names pool 'tpu', which is not one of the job-lane pools (cpu, gpu)" in found.problems[0]
    assert "summarize" not in found.by_name()


def test_a_flow_named_otherwise_than_its_task_fails_verification(site):
    found = load_catalogue([BUILTIN, _task_module(site, "teamname", "summarize", flow_name="summarise")])
    assert found.problems == ()
    report = verify(found, REPO)
    [problem] = report.problems
    assert "package 'teamname': task 'summarize': its flow is named 'summarise'" in problem
    assert "parameter 'top' has no description" in " ".join(report.warnings)
    # The test flow has no heartbeat hooks: its lost runs would never be found, and the report says so.
    assert any("sends no run heartbeats" in w and "**heartbeat_hooks()" in w for w in report.warnings)


def test_a_flow_that_does_not_load_fails_verification(site):
    entry = _task_module(site, "teamflow", "summarize")
    (site / "teamflow" / "flow.py").write_text("raise RuntimeError('model file missing')\n")
    report = verify(load_catalogue([BUILTIN, entry]), REPO)
    assert "task 'summarize': its entrypoint teamflow.flow.run does not load" in report.problems[0]
    assert "model file missing" in report.problems[0]


def test_a_warm_capable_task_that_only_imports_in_this_process_is_refused(site, tmp_path, monkeypatch):
    """Its module imports a helper found only on this process's sys.path, as in a shell that was set
    up by hand: the warm interpreters (fresh processes) would fail to load it."""
    elsewhere = tmp_path / "only-here"
    _module(elsewhere, "helper_only_here", "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    entry = _task_module(site, "teamwarm", "summarize", warm=True, extra_import="import helper_only_here")
    found = load_catalogue([BUILTIN, entry])
    assert found.problems == ()
    report = verify(found, REPO)
    [problem] = report.problems
    assert "warm-capable task 'summarize': teamwarm.flow does not import in a warm interpreter" in problem
    assert "No module named 'helper_only_here'" in problem


def test_the_bootstrap_refuses_a_bad_registration_before_creating_anything(site, monkeypatch):
    """No server is needed: the check comes before the first API call (a client that is never used)."""
    import asyncio

    from taskserver.errors import RegistrationError
    from taskserver.platform import bootstrap as bootstrap_module
    from taskserver.platform import tasks

    bad = load_catalogue([BUILTIN, _task_module(site, "teamclash2", "cluster")])
    monkeypatch.setattr(tasks, "catalogue", lambda: bad)
    monkeypatch.setattr(bootstrap_module, "catalogue", lambda: bad)

    class NeverCalled:
        def __getattr__(self, name):
            raise AssertionError(f"the bootstrap used the API ({name}) despite a bad registration")

    with pytest.raises(RegistrationError) as raised:
        asyncio.run(bootstrap_module.bootstrap_async(client=NeverCalled(), directory=REPO))
    message = str(raised.value)
    assert "installed task types: 1 problem(s)" in message and "'cluster' is already registered" in message
    assert "nothing was created" in message


@pytest.mark.parametrize(("package", "handler_module", "reference", "reason"), [
    ("teamreqa", "", "teamreqa.requests:HANDLER", "does not load: ModuleNotFoundError"),
    ("teamreqb", "HANDLER = {'params': dict}\n", "teamreqb.requests:HANDLER", "is a dict, not a taskserver RequestHandler"),
    ("teamreqc", "", "teamreqc.requests", "is not of the form package.module:NAME"),
], ids=["missing-module", "not-a-handler", "no-attribute"])
def test_a_request_handler_that_is_not_one_fails_verification_naming_the_package(site, package, handler_module,
                                                                                   reference, reason):
    entry = _task_module(site, package, "summarize", request_handler=reference)
    if handler_module:
        _module(site, f"{package}.requests", handler_module)
    report = verify(load_catalogue([BUILTIN, entry]), REPO)
    [problem] = report.problems
    assert problem.startswith(f"package {package!r}: task 'summarize': request handler") and reason in problem


def test_the_example_packages_request_handler_serves_a_batch_with_the_librarys_answers(monkeypatch):
    from taskserver.errors import ParameterError
    from taskserver.platform.request_lane import catalogue as request_catalogue
    from taskserver.platform.request_lane.batches import run_batch

    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    found = load_catalogue([BUILTIN, EntryPoint("keywords", "taskserver_keywords:TASK", TASK_ENTRY_POINTS)])
    monkeypatch.setattr(request_catalogue, "catalogue", lambda: found)  # this process's catalogue, with the example
    request_catalogue.request_tasks.cache_clear()
    try:
        assert request_catalogue.request_task_names() == ["encode", "infer", "extract-keywords"]
        from taskserver_keywords.keywords import top_keywords

        texts = [["queues order runs by priority", "workers take the highest first"], ["a warm model answers fast"]]
        prepared = [request_catalogue.prepare("extract-keywords", {"texts": t, "top": 2}, "high") for t in texts]
        assert len({p.batch_key for p in prepared}) == 1 and [p.size for p in prepared] == [2, 1]
        blank = request_catalogue.prepare("extract-keywords", {"texts": ["   "]})
        outcomes = run_batch([*prepared, blank])
        assert [o[0] for o in outcomes[:2]] == [{"keywords": top_keywords(t, 2)} for t in texts]
        assert outcomes[2][0] is None and outcomes[2][1]["input"] == "texts[0]"  # its own error; the others stand
        with pytest.raises(ParameterError, match=r"params.top: .*less than or equal to 50"):
            request_catalogue.prepare("extract-keywords", {"texts": ["x"], "top": 99})
    finally:
        request_catalogue.request_tasks.cache_clear()


def test_the_example_reads_a_file_writes_its_keywords_whole_and_names_a_bad_record(monkeypatch, tmp_path):
    import json

    from taskserver.errors import InvalidInputError

    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from taskserver_keywords.flow import extract_keywords
    from taskserver_keywords.keywords import keywords_of_file, top_keywords

    texts = ["queues order runs by priority", "workers take the highest first", "a warm model answers fast"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out" / "keywords.jsonl"
    assert keywords_of_file(str(source), str(out), top=2) == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"id": f"d{i}", "keywords": k} for i, k in enumerate(top_keywords(texts, 2))]
    assert sorted(p.name for p in out.parent.iterdir()) == ["keywords.jsonl"]  # no temporary file left

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "text": "fine words"}) + "\n" + json.dumps({"id": "b7", "text": "  "}) + "\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl record 'b7'.*blank"):
        keywords_of_file(str(bad), str(tmp_path / "never.jsonl"))
    assert not (tmp_path / "never.jsonl").exists()
    with pytest.raises(InvalidInputError, match="input_path and output go together"):
        extract_keywords.fn(input_path=str(source))
