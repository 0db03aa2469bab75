"""The OpenAPI 3.1 description of the API, served at /openapi.json (see api/docs.py)."""

from __future__ import annotations

from typing import Any

from actors.core.events import EventKind
from actors.core.model import WorkerStatus, WorkerType
from api.openapi_schemas import JSON, SCHEMAS, _enum, _ref


def _answer(status: str, description: str, schema: str | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {JSON: {"schema": _ref(schema)}}
    return {status: answer}


def _op(summary: str, *answers: dict[str, Any], body: str | None = None, **extra: Any) -> Any:
    responses: dict[str, Any] = {}
    for answer in answers:
        responses.update(answer)
    operation: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    return operation


ERR = "Error"
OAI = "OpenAIError"
SESSION = {"name": "x-session-id", "in": "header", "required": False, "schema": {"type": "string"}}
BAD = _answer("400", "invalid body, URL, id or filter; `field` names it", ERR)
MISSING = _answer("404", "no such worker", ERR)
AUTH = {**_answer("401", "admin key missing", ERR), **_answer("403", "admin key wrong", ERR)}
TYPE = _answer("415", "the body is not application/json", ERR)
BIG = _answer("413", "the body is over 1 MiB", ERR)
WORKER_ID = {"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}}
IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
FILTER_PARAMS = [
    {"name": "model", "in": "query", "schema": {"type": "string"}},
    {"name": "status", "in": "query", "schema": _enum(WorkerStatus)},
    {"name": "worker_type", "in": "query", "schema": _enum(WorkerType)},
]
WAIT_PARAMS = [
    {
        "name": "wait_for",
        "in": "query",
        "required": False,
        "schema": _enum(WorkerStatus),
        "description": "long-poll: answer once the worker has this status (at once if it has)",
    },
    {
        "name": "timeout_secs",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0, "maximum": 300, "default": 30},
        "description": "with wait_for: answer after this long with the current record and "
        "X-Wait-Timed-Out: true",
    },
]
TIMED_OUT = {
    "X-Wait-Timed-Out": {
        "description": "`true` when a long-poll ended by its timeout_secs",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
EVENT_PARAMS = [
    {"name": "model", "in": "query", "schema": {"type": "string", "minLength": 1}},
    {"name": "worker_type", "in": "query", "schema": _enum(WorkerType)},
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "resume after this sequence number, or get `reset` and the full state",
    },
    {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "the same as the Last-Event-ID header, for clients that cannot set it",
    },
]
EVENTS_ANSWER = {
    "200": {
        "description": "text/event-stream: the current state (one event per worker, no id), "
        "`synced` (id: the head's sequence number), then each change with `id:` its sequence "
        'number and `event:` its kind; `data:` is the WorkerInfo JSON (`{"seq": n}` for '
        "`synced` and `reset`); a `: heartbeat` comment after 15 s without events. A client "
        "that stops reading is dropped (the connection is closed).",
        "content": {
            "text/event-stream": {
                "schema": {"type": "string"},
                "x-event-kinds": _enum(EventKind)["enum"],
                "x-event-data": {"oneOf": [_ref("WorkerInfo"), _ref("FeedMarker")]},
            }
        },
    }
}
PATHS: dict[str, Any] = {
    "/workers": {
        "post": _op(
            "Register a worker",
            _answer("202", "created pending", "Accepted"),
            BAD,
            _answer("409", "the address is registered", ERR),
            BIG,
            TYPE,
            AUTH,
            _answer("503", "registration queue full; nothing kept", ERR),
            body="WorkerSpec",
        ),
        "get": _op(
            "List workers",
            _answer("200", "all workers", "WorkerList"),
            BAD,
            parameters=FILTER_PARAMS,
        ),
    },
    "/workers/events": {
        "get": _op(
            "Follow the registry: server-sent events of every change",
            EVENTS_ANSWER,
            _answer("400", "bad filter or unknown parameter", ERR),
            _answer("405", "not GET", ERR),
            parameters=EVENT_PARAMS,
        )
    },
    "/workers/{worker_id}": {
        "parameters": [WORKER_ID],
        "get": _op(
            "One worker; with wait_for, a long-poll for its status",
            {
                "200": {
                    "description": "the worker (with wait_for: once it has the status, or at "
                    "the timeout with X-Wait-Timed-Out: true)",
                    "headers": TIMED_OUT,
                    "content": {JSON: {"schema": _ref("WorkerInfo")}},
                }
            },
            BAD,
            _answer("404", "no such worker, or it was removed during the wait", ERR),
            parameters=WAIT_PARAMS,
        ),
        "put": _op(
            "Replace a worker's spec in place",
            _answer("202", "re-detecting", "Accepted"),
            BAD,
            MISSING,
            _answer("409", "draining", ERR),
            _answer("412", "moved on", ERR),
            BIG,
            TYPE,
            AUTH,
            body="WorkerSpec",
            parameters=[IF_MATCH],
        ),
        "patch": _op(
            "Update priority, cost, labels, api_key, health",
            _answer("200", "applied", "WorkerInfo"),
            BAD,
            MISSING,
            _answer("412", "moved on", ERR),
            BIG,
            TYPE,
            AUTH,
            body="WorkerPatch",
            parameters=[IF_MATCH],
        ),
        "delete": _op(
            "Remove a worker (drains a ready one)",
            _answer("202", "removing", "Accepted"),
            BAD,
            MISSING,
            AUTH,
        ),
    },
    "/workers/{worker_id}/retry": {
        "parameters": [WORKER_ID],
        "post": _op(
            "Re-run a failed registration",
            _answer("202", "queued", "Accepted"),
            BAD,
            MISSING,
            _answer("409", "not failed", ERR),
            AUTH,
        ),
    },
    "/v1/models": {
        "get": _op("Models served by a ready worker", _answer("200", "list", "ModelList"))
    },
    **{
        path: {
            "post": _op(
                summary,
                _answer("200", "the worker's answer (SSE when stream is true); x-worker-id"),
                _answer("400", "bad body or model", OAI),
                _answer("404", "no worker lists the model", OAI),
                _answer("413", "body over 32 MiB", OAI),
                _answer("501", "served only by gRPC workers", OAI),
                _answer("502", "the workers failed and retries are used up", OAI),
                _answer("503", "no routable worker now (Retry-After)", OAI),
                _answer("504", "the worker timed out", OAI),
                body="InferenceRequest",
                parameters=[SESSION],
            )
        }
        for path, summary in (
            ("/v1/chat/completions", "Chat completion, proxied"),
            ("/v1/completions", "Completion, proxied"),
            ("/v1/embeddings", "Embeddings, proxied"),
            ("/generate", "SGLang native generate, proxied"),
        )
    },
    "/health": {"get": _op("Process is alive", _answer("200", "OK"))},
    "/liveness": {"get": _op("Process is alive", _answer("200", "OK"))},
    "/readiness": {
        "get": _op(
            "A worker is ready and healthy", _answer("200", "ready"), _answer("503", "not ready")
        )
    },
    "/metrics": {"get": _op("Prometheus metrics (text format)", _answer("200", "metrics"))},
    "/openapi.json": {"get": _op("This description", _answer("200", "OpenAPI 3.1"))},
    "/docs": {"get": _op("This description as a page", _answer("200", "HTML"))},
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "trio-model-gateway", "version": "0.1.0"},
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }
