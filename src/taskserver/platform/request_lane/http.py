"""``python -m taskserver.platform.request_lane.http``: the request lane's HTTP endpoint on 127.0.0.1.

``POST /requests`` takes ``{"task", "params", "priority"}`` (or a list of them) and answers once the
rows are committed; ``?wait=SECONDS`` also waits for the result. ``GET /requests/{id}`` reads one.
Bad input gets a 4xx whose body names the input, the reason and what to do. With
``TASKSERVER_AUTH_STRING`` set every route but ``/health`` wants the same basic auth as the stack.
"""

from __future__ import annotations

import json
import secrets
import sys
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Optional

import typer

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from taskserver import commands
from taskserver.errors import ParameterError, RequestTimeoutError, TaskserverError
from taskserver.platform.priorities import DEFAULT_PRIORITY
from taskserver.platform.request_lane import ENDPOINT_MODULE, queue
from taskserver.platform.request_lane.batches import error_record
from taskserver.platform.request_lane.client import AsyncRequestClient, item
from taskserver.platform.request_lane.catalogue import prepare
from taskserver.settings import Settings, get_settings

HOST = "127.0.0.1"
MAX_WAIT_SECONDS = 300.0
_ENVELOPE = ("task", "params", "priority")


def record_json(record: queue.RequestRecord) -> dict[str, Any]:
    """A request as the endpoint and the CLI show it."""
    return {"id": str(record.id), "task": record.task, "priority": record.priority, "state": record.state,
            "attempts": record.attempts, "result": record.result, "error": record.error,
            "submitted_at": record.submitted_at.isoformat(),
            "started_at": record.started_at.isoformat() if record.started_at else None,
            "finished_at": record.finished_at.isoformat() if record.finished_at else None}


def _problem(status: int, exc: TaskserverError) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error_record(exc)})


def _envelope(body: Any, where: str) -> tuple[Any, Any, Any]:
    if not isinstance(body, dict):
        raise ParameterError(where, f"expected a JSON object, got {type(body).__name__}",
                             'send {"task": "encode", "params": {"texts": ["a text"]}, "priority": "normal"}')
    unknown = sorted(set(body) - set(_ENVELOPE))
    if unknown or "task" not in body:
        reason = f"unknown keys {unknown}" if unknown else "no 'task'"
        raise ParameterError(where, reason, f"a request has the keys: {', '.join(_ENVELOPE)}")
    return body["task"], body.get("params", {}), body.get("priority", DEFAULT_PRIORITY)


def create_app(settings: Settings | None = None, url: str | None = None) -> FastAPI:
    """The endpoint's ASGI app. Long on purpose: FastAPI's routes are closures over this app's
    client and settings, and one app's routes read best together (each is a few lines)."""
    settings = settings or get_settings()
    lane: dict[str, AsyncRequestClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        lane["client"] = AsyncRequestClient(url, settings)
        yield
        await lane["client"].close()

    app = FastAPI(title="taskserver request lane", lifespan=lifespan)
    basic = HTTPBasic(auto_error=False)

    def authorized(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        expected = settings.auth_string.get_secret_value()
        if not expected:
            return
        given = f"{credentials.username}:{credentials.password}" if credentials else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "credentials missing or wrong: use the stack's TASKSERVER_AUTH_STRING",
                                headers={"WWW-Authenticate": "Basic"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/requests", dependencies=[Depends(authorized)])
    async def post_requests(request: Request, wait: float = 0) -> Any:
        raw = await request.body()
        if len(raw) > settings.request_max_bytes + 4096:
            return _problem(413, ParameterError("request body", f"{len(raw):,} bytes, over the limit of"
                                                f" {settings.request_max_bytes:,}", "pass large inputs as a file to a flow run"))
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return _problem(400, ParameterError("request body", f"not JSON ({exc})",
                                                "send application/json, e.g. {\"task\": \"encode\", \"params\": {...}}"))
        client = lane["client"]
        if isinstance(body, list):
            items = []
            for index, entry in enumerate(body):
                try:
                    items.append(item(*_envelope(entry, f"request body[{index}]")))
                except TaskserverError as exc:
                    items.append(queue.NewRequest("?", "?", queue.NO_RANK_LIMIT, "invalid", None,
                                                  error=error_record(exc)))
            ids = await client.submit_items(items)
            return await _answer(client, ids, wait, many=True)
        try:
            prepared = prepare(*_envelope(body, "request body"))
        except TaskserverError as exc:
            return _problem(422, exc)
        new = queue.NewRequest(prepared.task, prepared.priority, prepared.rank, prepared.batch_key,
                               prepared.params.model_dump(), prepared.size)
        return await _answer(client, await client.submit_items([new]), wait, many=False)

    @app.get("/requests/{request_id}", dependencies=[Depends(authorized)])
    async def get_request(request_id: str, wait: float = 0) -> Any:
        try:
            key = uuid.UUID(request_id)
        except ValueError:
            return _problem(400, ParameterError(f"request id {request_id!r}", "is not a UUID"))
        found = await lane["client"].records([key])
        if key not in found:
            return _problem(404, ParameterError(f"request {request_id}", "not found",
                                                "it was never submitted, or its retention period passed"))
        return await _answer(lane["client"], [key], wait, many=False)

    return app


async def _answer(client: AsyncRequestClient, ids: list[uuid.UUID], wait: float, many: bool) -> JSONResponse:
    records: dict[uuid.UUID, queue.RequestRecord] = {}
    if wait > 0:
        try:
            records = await client.wait(ids, min(wait, MAX_WAIT_SECONDS))
        except RequestTimeoutError:
            pass
    missing = [i for i in ids if i not in records]
    if missing:
        records.update(await client.records(missing))
    body = [record_json(records[i]) for i in ids]
    done = all(records[i].finished for i in ids)
    return JSONResponse(status_code=200 if done else 202, content=body if many else body[0])


def serve(
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Default: TASKSERVER_REQUEST_PORT.")] = None,  # noqa: UP007
    host: Annotated[str, typer.Option(
        help="Address to listen on. In a cluster 0.0.0.0 behind a Service; anywhere else keep the"
        " loopback default, or set TASKSERVER_AUTH_STRING.")] = HOST,
) -> None:
    """Serve the request lane's HTTP endpoint (POST /requests, GET /requests/{id})."""
    import uvicorn

    settings = get_settings()
    if host != HOST and not settings.auth_string.get_secret_value():
        print(f"request endpoint: listening on {host} without authentication (TASKSERVER_AUTH_STRING"
              " is empty): anyone who can reach the port can submit requests", file=sys.stderr)
    uvicorn.run(create_app(settings), host=host, port=port or settings.request_port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    commands.run(serve, argv, prog=f"python -m {ENDPOINT_MODULE}")


if __name__ == "__main__":
    main()
