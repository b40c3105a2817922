"""What a person sees in the Prefect UI: headless Chromium against a running `taskserver up` stack.

Every assertion reads the DOM the UI rendered (``chromium --dump-dom``), and the runs a person
starts are started from the custom-run form itself (Playwright driving the same Chromium: it types
into the fields and clicks Submit). Screenshots of the pages are kept under ``build/test-artifacts/ui`` (or ``$TASKSERVER_TEST_ARTIFACTS/ui``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

import pytest

from platform_support import BIN, base_env, free_port, wait_until
from taskserver.platform.deployments import deployment_specs
from taskserver.platform.submission import FINAL_STATE_TYPES
from taskserver.platform.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("TASKSERVER_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "ui"
CHROMIUM = shutil.which("chromium") or "chromium"  # Debian's package (.ci/system-deps.sh)
FIELD_TAGS = {"input", "textarea", "select", "button"}

pytestmark = pytest.mark.slow


def _cli(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = base_env(TASKSERVER_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(BIN / "taskserver"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack, kept light: SQLite, one warm interpreter, one slot per job worker."""
    home = tmp_path_factory.mktemp("ui") / "home"
    port = free_port()
    started = _cli(home, "up", "--port", str(port), "--database", "sqlite", "--warm-interpreters", "1",
                   "--slots", "1")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield home, f"http://127.0.0.1:{port}"
    finally:
        _cli(home, "down")


def _api(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{base}/api/{path}", data=json.dumps(body or {}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _browse(url: str, screenshot: str | None = None) -> str:
    """The DOM after the single-page app has rendered (a virtual-time budget lets its API calls land)."""
    common = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,2000",
              "--virtual-time-budget=15000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run([*common, f"--screenshot={SCREENSHOTS / screenshot}", url],
                              capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and (SCREENSHOTS / screenshot).stat().st_size > 0, shot.stderr[-2000:]
    return dom.stdout


class _FormProperties(HTMLParser):
    """Each schema-form property's label, its description's text and the form fields inside that description."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[str] = []
        self.descriptions: list[dict] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, role) of open elements

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        role = ("label" if "schema-form-property__label" in classes else
                "description" if "schema-form-property__description" in classes else None)
        if role == "description":
            self.descriptions.append({"text": "", "fields": []})
        if self._inside("description") and tag in FIELD_TAGS:
            self.descriptions[-1]["fields"].append(tag)
        if role == "label":
            self.labels.append("")
        if tag not in {"input", "br", "hr", "img", "meta", "link", "path", "circle"}:
            self._open.append((tag, role))

    def handle_endtag(self, tag):
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                del self._open[index:]
                return

    def handle_data(self, data):
        if self._inside("description"):
            self.descriptions[-1]["text"] += data
        elif self._inside("label"):
            self.labels[-1] += data

    def _inside(self, role: str) -> bool:
        return any(r == role for _, r in self._open)


def _deployment_id(base: str, full_name: str) -> str:
    flow, name = full_name.split("/")
    found = _api(base, "deployments/filter", {"deployments": {"name": {"any_": [name]}},
                                              "flows": {"name": {"any_": [flow]}}})
    assert len(found) == 1, (full_name, found)
    return found[0]["id"]


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_custom_run_form_shows_every_parameter_with_its_description_and_no_stray_fields(stack, task):
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    _, base = stack
    schema = parameter_schema_from_entrypoint(str(REPO / task.entrypoint)).model_dump_for_openapi()
    full_name = f"{task.name}/high"
    page = _FormProperties()
    page.feed(_browse(f"{base}/deployments/deployment/{_deployment_id(base, full_name)}/run",
                      f"form-{task.name}.png" if task.name in ("encode", "train") else None))

    labels = [label.strip().removesuffix("(Optional)").strip() for label in page.labels]
    assert labels == list(schema["properties"]), f"{full_name}: the form shows {labels}"
    for (name, field), shown in zip(schema["properties"].items(), page.descriptions):
        assert _words(shown["text"]) == _words(field["description"]), f"{full_name}.{name}: {shown['text']!r}"
        assert shown["fields"] == [], f"{full_name}.{name}: form fields inside its description: {shown['fields']}"
    required = set(schema.get("required", []))
    assert {label.strip() for label in page.labels if "(Optional)" not in label} == required


def test_deployments_list_tells_flows_and_lanes_apart(stack):
    _, base = stack
    dom = _browse(f"{base}/deployments", "deployments.png")
    shown = [spec for spec in deployment_specs() if f">{spec.name}<" in dom.replace("> ", ">").replace(" <", "<")]
    assert shown, "no deployment names in the list"
    flows = {spec.flow_name for spec in shown}
    assert all(f">{flow}<" in dom.replace("> ", ">").replace(" <", "<") for flow in flows)
    for tag in ("lane:warm", "lane:job", "priority:critical"):
        assert tag in dom, f"the list shows no {tag} tag"


def _artifacts(base: str, flow_run_id: str) -> dict[str, dict]:
    found = _api(base, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {artifact["key"]: artifact for artifact in found if artifact.get("key")}


def _flow_run(base: str, flow_run_id: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/flow_runs/{flow_run_id}", timeout=30) as response:
        return json.loads(response.read())


def _wait_final(base: str, flow_run_id: str, timeout: float) -> dict:
    def final():
        found = _flow_run(base, flow_run_id)
        return found if found["state"] and found["state"]["type"] in FINAL_STATE_TYPES else None

    return wait_until(final, timeout, f"flow run {flow_run_id} to finish", interval=1.0)


def _submit_from_the_form(base: str, full_name: str, fill: Callable, screenshot: str) -> dict:
    """Open the deployment's custom-run form in Chromium, let ``fill(form)`` type into it as a person
    would, click Submit and return the flow run the UI created (from the API call it made)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 2000})
            page.goto(f"{base}/deployments/deployment/{_deployment_id(base, full_name)}/run")
            page.locator(".schema-form-property__label").first.wait_for(timeout=60_000)
            fill(_Form(page))
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / screenshot), full_page=True)
            with page.expect_response(lambda r: r.url.endswith("/create_flow_run")
                                      and r.request.method == "POST", timeout=60_000) as created:
                page.get_by_role("button", name="Submit", exact=True).click()
            assert created.value.status == 201, created.value.text()
            return created.value.json()
        finally:
            browser.close()


class _Form:
    """A custom-run form's parameters, found by their labels as a person finds them."""

    def __init__(self, page) -> None:
        self.page = page

    def _property(self, name: str):
        label = self.page.locator(".schema-form-property__label").filter(
            has_text=re.compile(rf"^\s*{re.escape(name)}(\s*\(Optional\))?\s*$"))
        found = self.page.locator(".schema-form-property").filter(has=label)
        assert found.count() >= 1, f"the form has no parameter labelled {name!r}"
        return found.last  # the innermost property that carries this label

    def add_item(self, name: str, text: str) -> None:
        prop = self._property(name)
        prop.get_by_role("button", name="Add item").click()
        prop.locator("textarea, input[type=text]").last.fill(text)

    def type(self, name: str, text: str) -> None:
        self._property(name).locator("textarea, input").first.fill(text)


def test_a_person_trains_on_the_shipped_tickets_from_the_form_and_sees_the_curve(stack):
    _, base = stack

    def shorten(form: _Form) -> None:  # data_path keeps the shipped tickets the form starts with
        for name, value in {"epochs": "2", "max_length": "16", "batch_size": "32", "checkpoint_every": "100"}.items():
            form.type(name, value)

    created = _submit_from_the_form(base, "train/high", shorten, "form-train-filled.png")
    assert created["parameters"]["epochs"] == 2 and created["parameters"]["max_length"] == 16
    assert str(created["parameters"]["data_path"]).startswith("samples:")
    finished = _wait_final(base, created["id"], 500)
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    summary = _artifacts(base, created["id"])["train-summary"]
    assert f"`outputs/models/{created['id']}/model`" in summary["data"]  # relative to the data dir
    dom = _browse(f"{base}/artifacts/artifact/{summary['id']}", "train-summary.png")
    marker = 'src="data:image/png;base64,'
    assert marker in dom, "the training curve is not an image on the artifact page"
    png = base64.b64decode(dom.split(marker, 1)[1].split('"', 1)[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_a_person_encodes_a_typed_text_from_the_form_and_a_bad_run_ends_with_one_readable_line(stack):
    _, base = stack
    created = _submit_from_the_form(base, "encode/high", lambda form: form.add_item("texts", "my invoice is wrong"),
                                    "form-encode-filled.png")
    assert created["parameters"]["texts"] == ["my invoice is wrong"]
    finished = _wait_final(base, created["id"], 300)
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    summary = _artifacts(base, created["id"])["encode-summary"]["data"]
    assert "| texts in | 1 |" in summary  # the typed text, not the deployment's sample file

    def both(form: _Form) -> None:
        form.add_item("texts", "a")
        form.type("input_path", "elsewhere.jsonl")

    bad = _submit_from_the_form(base, "encode/high", both, "form-encode-bad.png")
    finished = _wait_final(base, bad["id"], 300)
    assert finished["state"]["type"] == "FAILED", finished["state"]
    def error_logs():  # the run's logs reach the server a moment after its final state
        logs = _api(base, "logs/filter", {"logs": {"flow_run_id": {"any_": [bad["id"]]}}, "sort": "TIMESTAMP_ASC"})
        return logs if any(log["level"] >= 40 for log in logs) else None

    logs = wait_until(error_logs, 60, "the failed run's error log")
    last = [log["message"] for log in logs if log["level"] >= 40][-1]
    assert last.startswith("encode did not finish: texts/input_path: both texts and input_path are given")
    assert "\n" not in last and "Traceback" in "".join(log["message"] for log in logs)
    assert "both texts and input_path" in (finished["state"]["message"] or ""), finished["state"]
