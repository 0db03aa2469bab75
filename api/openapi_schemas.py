"""The component schemas of the OpenAPI description (api/openapi.py assembles the document).

The request bodies (``WorkerSpec``, ``HealthConfig``, ``WorkerPatch``, and the enums they use)
are not written here: they are the JSON Schema of the body models the API validates with
(``actors/core/model.py``), with each default taken from the library value's own default. The
answers' shapes below are written by hand and checked against real answers in the tests.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any

from pydantic.json_schema import models_json_schema

from actors.core.model import (
    HealthConfig,
    JobState,
    JobType,
    Runtime,
    WorkerPatchBody,
    WorkerSpec,
    WorkerSpecBody,
    WorkerStatus,
    WorkerType,
)

JSON = "application/json"
_PREFIX = "#/components/schemas/"


def body_schemas() -> dict[str, Any]:
    """The request bodies' component schemas, named by their titles, refs into components."""
    models = [(WorkerSpecBody, "validation"), (WorkerPatchBody, "validation")]
    _, top = models_json_schema(models, ref_template=_PREFIX + "{model}")  # type: ignore[arg-type]
    names = {key: schema.get("title", key) for key, schema in top["$defs"].items()}
    text = json.dumps(top["$defs"])
    for key, name in names.items():
        text = text.replace(f'"{_PREFIX}{key}"', f'"{_PREFIX}{name}"')
    schemas: dict[str, Any] = {names[key]: schema for key, schema in json.loads(text).items()}
    schemas["WorkerPatch"]["minProperties"] = 1  # the API refuses a PATCH that names nothing
    for name, value in (("WorkerSpec", WorkerSpec), ("HealthConfig", HealthConfig)):
        _library_defaults(schemas[name], value)
    _library_defaults(schemas["WorkerPatch"], None)
    return schemas


def _library_defaults(schema: dict[str, Any], value: Any) -> None:
    """Each property's default is the library value's (None: "not given", no default shown)."""
    defaults = {
        item.name: item.default
        for item in (dataclasses.fields(value) if value is not None else ())
        if item.default is not dataclasses.MISSING and item.default is not None
    }
    for name, prop in schema["properties"].items():
        prop.pop("default", None)
        if name in defaults:
            default = defaults[name]
            prop["default"] = default.value if isinstance(default, Enum) else default


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _enum(kind: Any) -> dict[str, Any]:
    values = [getattr(member, "value", member) for member in kind]
    return {"type": "string", "enum": values}


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
    **body_schemas(),
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
    "FeedMarker": {
        "type": "object",
        "required": ["seq"],
        "properties": {"seq": {"type": "integer"}},
        "description": "the data of the `synced` and `reset` events of GET /workers/events",
    },
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "code", "message", "param"],
                "properties": {
                    "type": {"type": "string"},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "stream": {"type": "boolean"},
            "user": {"type": "string", "description": "consistent_hash key if no x-session-id"},
        },
        "additionalProperties": True,
        "description": "forwarded unchanged to one ready, healthy worker serving the model",
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "owned_by"],
                    "properties": {"id": {"type": "string"}, "owned_by": {"type": "string"}},
                },
            },
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
