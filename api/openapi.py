"""The OpenAPI 3.1 description of the API, served at /openapi.json (see api/docs.py)."""

from __future__ import annotations

from typing import Any

from actors.model import JobState, JobType, Runtime, WorkerStatus, WorkerType

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _enum(kind: Any) -> dict[str, Any]:
    values = [getattr(member, "value", member) for member in kind]
    return {"type": "string", "enum": values}


def _number(minimum: float, exclusive: bool) -> dict[str, Any]:
    bound = "exclusiveMinimum" if exclusive else "minimum"
    return {"type": "number", bound: minimum}


HEALTH = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "timeout_secs": _number(0, True),
        "check_interval_secs": _number(0, True),
        "failure_threshold": {"type": "integer", "minimum": 1},
        "success_threshold": {"type": "integer", "minimum": 1},
        "disable": {"type": "boolean"},
        "drain_settle_secs": _number(0, False),
    },
}
LABELS = {"type": "object", "maxProperties": 128, "additionalProperties": {"type": "string"}}
SPEC_PROPERTIES: dict[str, Any] = {
    "url": {
        "type": "string",
        "maxLength": 2048,
        "description": "http://H:P, https://H:P, grpc://H:P, grpcs://H:P or bare H:P",
    },
    "model_id": {"type": "string", "description": "skip model detection, serve this model"},
    "worker_type": _enum(WorkerType),
    "bootstrap_port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "runtime": _enum(Runtime),
    "priority": {"type": "integer", "minimum": 0, "maximum": 100, "default": 50},
    "cost": {**_number(0, True), "default": 1.0},
    "labels": LABELS,
    "api_key": {"type": "string", "writeOnly": True},
    "health": _ref("HealthConfig"),
    "max_connection_attempts": {"type": "integer", "minimum": 1, "default": 20},
    "registration_timeout_secs": {**_number(0, True), "default": 60},
    "recheck_interval_secs": {**_number(0, False), "default": 30},
    "drain_timeout_secs": {**_number(0, False), "default": 30},
}
JOB = {
    "type": "object",
    "required": ["job_type", "status", "message", "attempts", "updated_at"],
    "properties": {
        "job_type": _enum(JobType),
        "status": _enum(JobState),
        "message": _nullable({"type": "string"}),
        "attempts": {"type": "integer", "minimum": 0},
        "updated_at": {"type": "number"},
    },
}
WORKER_INFO_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "format": "uuid"},
    "url": {"type": "string"},
    "model_id": _nullable({"type": "string"}),
    "models": {
        "type": "array",
        "items": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
    },
    "worker_type": _enum(WorkerType),
    "connection_mode": _nullable(_enum(["http", "grpc"])),
    "runtime_type": _enum([*(r.value for r in Runtime), "unspecified"]),
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "priority": {"type": "integer"},
    "cost": {"type": "number"},
    "bootstrap_port": _nullable({"type": "integer"}),
    "status": _enum(WorkerStatus),
    "is_healthy": {"type": "boolean"},
    "load": {"type": "integer", "minimum": 0, "description": "requests in flight through us"},
    "job_status": _nullable(_ref("JobStatus")),
    "created_at": {"type": "number"},
    "updated_at": {"type": "number"},
    "spec_version": {"type": "integer", "minimum": 1},
    "max_connection_attempts": {"type": "integer"},
    "registration_timeout_secs": {"type": "number"},
    "recheck_interval_secs": {"type": "number"},
    "drain_timeout_secs": {"type": "number"},
    "health": _ref("HealthConfig"),
}
SCHEMAS: dict[str, Any] = {
    "HealthConfig": HEALTH,
    "WorkerSpec": {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": SPEC_PROPERTIES,
    },
    "WorkerPatch": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "priority": SPEC_PROPERTIES["priority"],
            "cost": SPEC_PROPERTIES["cost"],
            "labels": {**LABELS, "additionalProperties": {"type": ["string", "null"]}},
            "api_key": SPEC_PROPERTIES["api_key"],
            "health": _ref("HealthConfig"),
        },
    },
    "JobStatus": JOB,
    "WorkerInfo": {
        "type": "object",
        "required": list(WORKER_INFO_PROPERTIES),
        "properties": WORKER_INFO_PROPERTIES,
        "not": {"required": ["api_key"]},
    },
    "WorkerList": {
        "type": "object",
        "required": ["workers", "total", "stats"],
        "properties": {
            "workers": {"type": "array", "items": _ref("WorkerInfo")},
            "total": {"type": "integer"},
            "stats": {
                "type": "object",
                "required": ["prefill_count", "decode_count", "regular_count", "by_status"],
            },
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["status", "worker_id", "url", "location", "message"],
        "properties": {
            "status": {"const": "accepted"},
            "worker_id": {"type": "string", "format": "uuid"},
            "url": {"type": "string"},
            "location": {"type": "string"},
            "message": {"type": "string"},
            "worker_status": _enum(["draining", "removed"]),
        },
    },
    "Error": {
        "type": "object",
        "required": ["error", "code"],
        "properties": {
            "error": {"type": "string"},
            "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
            "worker_id": {"type": "string"},
            "field": {"type": "string"},
        },
    },
}


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
    "/workers/{worker_id}": {
        "parameters": [WORKER_ID],
        "get": _op("One worker", _answer("200", "the worker", "WorkerInfo"), BAD, MISSING),
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
