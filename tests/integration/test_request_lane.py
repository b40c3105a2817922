"""The request lane on a real PostgreSQL with real drainer processes and the real model.

Priority order under a backlog, results equal to the library's, bad input answered per request,
a drainer SIGKILLed mid-batch and PostgreSQL restarted with requests queued (nothing lost or
written twice), the HTTP endpoint with basic auth, the CLI, and the Prefect records.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections import defaultdict

import numpy as np
import pytest

from platform_support import BIN, base_env, free_port, wait_until
from request_lane_support import DRAINER, ENDPOINT, LaneProcess, make_classifier

LONG = " ".join(f"word{i} of a long text about batching and queues" for i in range(40))

pytestmark = pytest.mark.torch_threads(1)  # the drainers run with OMP_NUM_THREADS=1: same kernels, same bits


@pytest.fixture
def lane(postgres_cluster, monkeypatch):
    """The lane's database URL, made this process's setting (the client reads it)."""
    from taskserver.settings import reload_settings

    monkeypatch.setenv("TASKSERVER_REQUEST_DATABASE_URL", postgres_cluster.url)
    reload_settings()
    yield postgres_cluster.url
    monkeypatch.delenv("TASKSERVER_REQUEST_DATABASE_URL")
    reload_settings()


@pytest.fixture
def client(lane):
    from taskserver.platform.request_lane.client import RequestClient

    with RequestClient(lane) as c:
        yield c


@pytest.fixture
def processes(tmp_path):
    started: list[LaneProcess] = []

    def start(module: str, url: str, ready: str | None = "draining", args=(), env=None, **settings) -> LaneProcess:
        variables = {f"TASKSERVER_{k.upper()}": str(v) for k, v in settings.items()} | (env or {})
        process = LaneProcess(module, url, tmp_path / f"{module.rsplit('.', 1)[-1]}-{len(started)}.log",
                              variables, list(args))
        started.append(process)
        return process.start(ready)

    yield start
    for process in started:
        process.stop()




def _by_batch(records) -> dict:
    batches = defaultdict(list)
    for record in records:
        batches[record.batch_id].append(record)
    return {key: sorted(rows, key=lambda r: r.batch_position) for key, rows in batches.items()}


def test_backlog_is_served_by_priority_then_in_submission_order(client, lane, processes):
    order = ["low"] * 12 + ["normal"] * 8 + ["critical"] * 3 + ["low"] * 4 + ["high"] * 5 + ["critical"] * 2
    handles = client.submit_many([("encode", {"texts": [f"request {i} at {p}"]}, p) for i, p in enumerate(order)])
    processes(DRAINER, lane, request_batch_size=4)
    records = client.wait([h.id for h in handles], timeout=240)
    assert all(r.state == "completed" for r in records.values())
    batches = sorted(_by_batch(records.values()).values(), key=lambda rows: min(r.started_at for r in rows))
    ranks = [rows[0].rank for rows in batches]
    assert ranks == sorted(ranks), [rows[0].priority for rows in batches]
    assert all(len({r.rank for r in rows}) == 1 and len(rows) <= 4 for rows in batches)
    for earlier, later in zip(batches, batches[1:]):
        if earlier[0].rank == later[0].rank:  # first in, first out within a level
            assert max(r.seq for r in earlier) < min(r.seq for r in later)
    assert [r.priority for r in batches[0]] == ["critical"] * 4  # the 3 + 2 criticals lead, in batches of 4


def test_results_equal_the_library_on_the_same_batch(client, lane, processes, tmp_path):
    from taskserver import encoding
    from taskserver.inference import Classifier

    model_dir = str(make_classifier(tmp_path / "model"))
    texts = [f"text {i}: " + " ".join(["soup", "goal", "rain"][i % 3] for _ in range(i % 7 + 1)) for i in range(30)]
    submitted = [("encode", {"texts": texts[i:i + 3]}, "high") for i in range(0, 30, 3)]
    submitted += [("encode", {"texts": [t], "normalize": False}) for t in texts[:5]]
    submitted += [("infer", {"texts": texts[i:i + 2], "model_dir": model_dir}) for i in range(0, 12, 2)]
    handles = client.submit_many(submitted)
    processes(DRAINER, lane)
    records = client.wait([h.id for h in handles], timeout=240)
    assert {r.state for r in records.values()} == {"completed"}
    for rows in _by_batch(records.values()).values():
        batch_texts = [t for r in rows for t in r.params["texts"]]
        if rows[0].task == "encode":
            expected = encoding.encode_texts(batch_texts, normalize=rows[0].params["normalize"]).vectors
            got = np.concatenate([np.asarray(r.result["embeddings"], dtype=np.float32) for r in rows])
            assert got.dtype == np.float32 and np.array_equal(got, expected)
        else:
            expected = Classifier.load(model_dir).predict(batch_texts)
            got = [p for r in rows for p in r.result["predictions"]]
            assert [p["label"] for p in got] == [p.label for p in expected]
            assert [p["probabilities"] for p in got] == [p.probabilities for p in expected]
    assert len(_by_batch(records.values())) == 3  # one model call per compatible group


def test_bad_input_gets_its_own_error_and_never_fails_the_good_requests(client, lane, processes, tmp_path):
    from taskserver.platform.request_lane import queue
    from taskserver.platform.request_lane.client import raise_for
    from taskserver.errors import EncodingInputError, ModelDirectoryError, ParameterError

    model_dir = str(make_classifier(tmp_path / "model"))
    megabyte = "lorem ipsum " * 87_382  # 1 MB: embeds, clipped to the model's window like the library
    good = [("encode", {"texts": ["a good text"]}), ("encode", {"texts": [megabyte]}),
            ("infer", {"texts": ["hot soup"], "model_dir": model_dir})]
    bad = {
        "empty text": (("encode", {"texts": [""]}), EncodingInputError, "params.texts[0]"),
        "non-string text": (("encode", {"texts": [42]}), EncodingInputError, "not a string"),
        "too many texts": (("encode", {"texts": ["x"] * 257}), ParameterError, "over the limit of 256"),
        "unknown task": (("summarise", {"texts": ["x"]}), ParameterError, "task 'summarise'"),
        "unknown priority": (("encode", {"texts": ["x"]}, "urgent"), ParameterError, "priority 'urgent'"),
        "wrong type": (("encode", {"texts": ["x"], "normalize": "yes"}), ParameterError, "params.normalize"),
        "params not an object": (("encode", ["x"]), ParameterError, "expected a JSON object"),
    }
    handles = client.submit_many(good + [case for case, _, _ in bad.values()])
    # The same bad input written straight into the table (an older client, another writer): the
    # drainer checks each row again, and one batch carries the good and the bad together.
    key = "encode:normalize=True"
    raw = [queue.NewRequest("encode", "normal", 3, key, params) for params in
           ({"texts": [""]}, {"texts": "not a list"}, {"texts": ["x"], "extra": 1}, {"texts": ["fine"]})]
    raw.append(queue.NewRequest("infer", "normal", 3, f"infer:model_dir={model_dir}",
                                {"texts": ["rain"], "model_dir": str(tmp_path / "missing")}))
    raw.append(queue.NewRequest("infer", "normal", 3, f"infer:model_dir={model_dir}",
                                {"texts": ["rain"], "model_dir": model_dir}))
    raw_ids = client.submit_items(raw)
    processes(DRAINER, lane)
    records = client.wait([h.id for h in handles] + raw_ids, timeout=240)

    for handle in handles[:len(good)]:
        assert records[handle.id].state == "completed"
    assert len(records[handles[1].id].result["embeddings"][0]) == 384
    for handle, (name, (_, error, text)) in zip(handles[len(good):], bad.items()):
        with pytest.raises(error) as raised:
            raise_for(records[handle.id])
        assert text in str(raised.value), name
    states = {i: records[i] for i in raw_ids}
    assert [states[i].state for i in raw_ids] == ["failed", "failed", "failed", "completed", "failed", "completed"]
    assert "empty text" in states[raw_ids[0]].error["message"]
    assert "valid list" in states[raw_ids[1]].error["message"]
    assert "extra" in states[raw_ids[2]].error["message"]
    assert states[raw_ids[4]].error["type"] == ModelDirectoryError.__name__
    assert "model directory not found" in states[raw_ids[4]].error["reason"]
    assert len({states[i].batch_id for i in raw_ids[:4]}) == 1  # bad and good, one batch


def test_a_drainer_killed_mid_batch_loses_nothing_and_completes_each_request_once(client, lane, processes):
    settings = dict(request_lease_seconds=2, request_batch_max_texts=96)
    handles = client.submit_many([("encode", {"texts": [f"{i} {LONG}"] * 16}, "normal") for i in range(24)])
    ids = [h.id for h in handles]
    first = processes(DRAINER, lane, **settings)

    def mid_batch():
        rows = client.records(ids).values()
        return any(r.state == "running" for r in rows) and any(r.state == "completed" for r in rows)

    wait_until(mid_batch, 180, "a batch running after one completed", interval=0.05)
    first.kill()
    killed = {r.id for r in client.records(ids).values() if r.state == "running"}
    assert killed
    second = processes(DRAINER, lane, **settings)
    records = client.wait(ids, timeout=300)
    assert {r.state for r in records.values()} == {"completed"}
    assert all(records[i].attempts == 2 for i in killed)
    assert first.written() + second.written() == len(ids)  # each completion written exactly once
    assert "requeued" in second.text() or "requeued" in first.text()


def test_postgres_restart_with_requests_queued_loses_and_repeats_nothing(client, lane, processes, postgres_cluster):
    handles = client.submit_many([("encode", {"texts": [f"{i} {LONG}"] * 8}, "low") for i in range(40)])
    ids = [h.id for h in handles]
    drainer = processes(DRAINER, lane, request_batch_max_texts=32)
    wait_until(lambda: any(r.state == "completed" for r in client.records(ids).values()), 180, "first results")
    postgres_cluster.stop()
    log_tail = lambda: f"drainer log (last 6000 characters):\n{drainer.text()[-6000:]}"  # noqa: E731
    wait_until(lambda: "database unavailable" in drainer.text() or "not written yet" in drainer.text()
               or "not renewed" in drainer.text(), 60, "the drainer to notice the outage", details=log_tail)
    postgres_cluster.start()
    records = wait_until(lambda: _all_finished(client, ids), 300, "every request after the restart", interval=1,
                         details=log_tail)
    assert len(records) == len(ids) and {r.state for r in records.values()} == {"completed"}
    assert drainer.written() == len(ids)
    assert drainer.process.poll() is None  # it waited the outage out


def _all_finished(client, ids):
    try:
        records = client.records(ids)
    except Exception:  # noqa: BLE001 - the client's pool reconnects once the server is back
        return None
    return records if all(r.finished for r in records.values()) else None


def _http(url, body=None, auth=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_http_endpoint_round_trip_with_basic_auth(lane, processes):
    auth = "lane-user:s3cret-pw"
    port = free_port()
    processes(DRAINER, lane, auth_string=auth)
    processes(ENDPOINT, lane, ready=None, args=["--port", str(port)], auth_string=auth)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _up(base), 60, "the endpoint")
    good = {"task": "encode", "params": {"texts": ["over http"]}, "priority": "critical"}

    assert _http(f"{base}/requests", good)[0] == 401
    assert _http(f"{base}/requests", good, auth="lane-user:wrong")[0] == 401
    status, body = _http(f"{base}/requests?wait=60", good, auth=auth)
    assert status == 200 and body["state"] == "completed" and body["priority"] == "critical"
    assert len(body["result"]["embeddings"][0]) == 384
    assert _http(f"{base}/requests/{body['id']}", auth=auth)[1]["result"] == body["result"]

    status, problem = _http(f"{base}/requests", raw=b"{not json", auth=auth)
    assert status == 400 and "not JSON" in problem["error"]["reason"]
    status, problem = _http(f"{base}/requests", {"task": "summarise", "params": {"texts": ["x"]}}, auth=auth)
    assert status == 422 and "summarise" in problem["error"]["message"] and "encode" in problem["error"]["hint"]
    status, problem = _http(f"{base}/requests", {**good, "params": {"texts": [""]}}, auth=auth)
    assert status == 422 and "empty text" in problem["error"]["message"]
    status, many = _http(f"{base}/requests?wait=60", [good, {"task": "encode", "priority": "soon"}], auth=auth)
    assert status == 200 and [m["state"] for m in many] == ["completed", "failed"]
    assert "priority 'soon'" in many[1]["error"]["message"]
    assert _http(f"{base}/requests/{uuid.uuid4()}", auth=auth)[0] == 404


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/health", timeout=2)
        return True
    except OSError:
        return False


def test_cli_request_prints_the_result_and_refuses_bad_input_by_name(lane, processes, tmp_path):
    processes(DRAINER, lane)
    env = base_env(TASKSERVER_REQUEST_DATABASE_URL=lane)
    ok = subprocess.run([str(BIN / "taskserver"), "request", "submit", "encode", "-p", "high", "--param",
                         'texts=["from the command line"]'], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout)
    assert record["state"] == "completed" and len(record["result"]["embeddings"][0]) == 384
    bad = subprocess.run([str(BIN / "taskserver"), "request", "submit", "encode", "-p", "asap", "--param",
                          'texts=["x"]'], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "priority 'asap'" in bad.stderr and "critical" in bad.stderr


def test_each_request_is_a_prefect_task_run_under_one_flow_run_per_batch(lane, processes, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    from taskserver.platform.request_lane.client import RequestClient

    processes(DRAINER, lane, env={"PREFECT_API_URL": prefect_server.api_url})
    with RequestClient(lane) as c:
        handles = c.submit_many([("encode", {"texts": [f"recorded {i}"]}, "high") for i in range(5)]
                                + [("encode", {"texts": ["x"]}, "low")])
        records = c.wait([h.id for h in handles], timeout=120)
    batch_ids = {str(r.batch_id) for r in records.values()}
    assert len(batch_ids) == 2  # the five high ones share a batch; the low one has its own

    async def read():
        async with get_client() as prefect:
            runs = await prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["request-batch"])))
            ours = [run for run in runs if any(b in run.name for b in batch_ids)]
            tasks = await prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in ours]))) if ours else []
            return ours, tasks

    def recorded():
        ours, tasks = asyncio.run(read())
        done = len(ours) == 2 and all(run.state and run.state.is_completed() for run in ours)
        return (ours, tasks) if done and len(tasks) == 6 else None

    runs, tasks = wait_until(recorded, 120, "the batches' flow and task runs in Prefect")
    names = {task.name for task in tasks}
    assert names == {f"request-{r.id}-{r.priority}" for r in records.values()}
    assert {len({t.flow_run_id for t in tasks})} == {2}
