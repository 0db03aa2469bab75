"""The component schemas of the OpenAPI description (api/openapi.py assembles the document)."""

from __future__ import annotations

from typing import Any

from actors.core.model import JobState, JobType, Runtime, WorkerStatus, WorkerType

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
        "timeout_secs": _number(0.01, False),
        "check_interval_secs": _number(0.1, False),
        "failure_threshold": {"type": "integer", "minimum": 1, "maximum": 1000},
        "success_threshold": {"type": "integer", "minimum": 1, "maximum": 1000},
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
    "max_connection_attempts": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 20},
    "registration_timeout_secs": {**_number(0.01, False), "default": 60},
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
