"""Strict parsing of request bodies into domain values (JSON → WorkerSpec / WorkerPatch).

Every problem is an InvalidInput naming the field (dotted for nested ones: ``health.timeout_secs``
or ``labels.zone``). Unknown fields, nested ones included, are refused, never ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from actors.errors import InvalidInput
from actors.model import HealthConfig, Runtime, WorkerPatch, WorkerSpec, WorkerType
from actors.urls import parse_worker_url

MAX_LABELS = 128
MAX_LABEL_KEY_BYTES = 256
MAX_LABEL_VALUE_BYTES = 4096
MAX_TEXT_BYTES = 4096


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json_object(body: bytes | str) -> dict[str, Any]:
    """Parse a request body that must be a JSON object."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput("", f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidInput("", f"the body must be a JSON object, not {_kind(data)}")
    return data


# ---- field checkers: (field name, raw value) -> value, or raise InvalidInput ------------------


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _size(field: str, value: str) -> int:
    """UTF-8 length; a string JSON decoded with a lone surrogate is refused."""
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise InvalidInput(field, "is not valid Unicode text (lone surrogate)") from None


def _text(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {_kind(value)}")
    if not value:
        raise InvalidInput(field, "must not be empty")
    if _size(field, value) > MAX_TEXT_BYTES:
        raise InvalidInput(field, f"is longer than {MAX_TEXT_BYTES} bytes")
    return value


def _integer(low: int, high: int) -> Callable[[str, object], int]:
    def check(field: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(field, f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            raise InvalidInput(field, f"must be between {low} and {high}, not {value}")
        return value

    return check


def _number(*, minimum: float, exclusive: bool) -> Callable[[str, object], float]:
    def check(field: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(field, f"must be a number, not {_kind(value)}")
        number = float(value)
        too_small = number <= minimum if exclusive else number < minimum
        if too_small or not math.isfinite(number) or number > 1e9:
            bound = f"greater than {minimum:g}" if exclusive else f"at least {minimum:g}"
            raise InvalidInput(field, f"must be a finite number {bound}, not {value}")
        return number

    return check


def _boolean(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(field, f"must be true or false, not {_kind(value)}")
    return value


def _choice(kind: type[WorkerType] | type[Runtime]) -> Callable[[str, object], Any]:
    def check(field: str, value: object) -> Any:
        allowed = [member.value for member in kind]
        if not isinstance(value, str) or value not in allowed:
            raise InvalidInput(field, f"must be one of {', '.join(allowed)}, not {value!r}")
        return kind(value)

    return check


def _labels(field: str, value: object, *, allow_null: bool = False) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(field, f"must be an object of strings, not {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise InvalidInput(field, f"has {len(value)} labels; at most {MAX_LABELS} are accepted")
    for key, item in value.items():
        if not key or _size(field, key) > MAX_LABEL_KEY_BYTES:
            raise InvalidInput(field, f"keys must be 1 to {MAX_LABEL_KEY_BYTES} bytes")
        if item is None and allow_null:
            continue
        if not isinstance(item, str):
            raise InvalidInput(f"{field}.{key}", f"must be a string, not {_kind(item)}")
        if _size(f"{field}.{key}", item) > MAX_LABEL_VALUE_BYTES:
            raise InvalidInput(f"{field}.{key}", f"is longer than {MAX_LABEL_VALUE_BYTES} bytes")
    return dict(value)


_HEALTH_FIELDS: dict[str, Callable[[str, object], Any]] = {
    "timeout_secs": _number(minimum=0, exclusive=True),
    "check_interval_secs": _number(minimum=0, exclusive=True),
    "failure_threshold": _integer(1, 1000),
    "success_threshold": _integer(1, 1000),
    "disable": _boolean,
    "drain_settle_secs": _number(minimum=0, exclusive=False),
}


def _fields(
    where: str, data: Mapping[str, Any], checkers: Mapping[str, Callable[[str, object], Any]]
) -> dict[str, Any]:
    """Check every present, non-null field; refuse unknown ones."""
    values = {}
    for name, raw in data.items():
        field = f"{where}.{name}" if where else name
        checker = checkers.get(name)
        if checker is None:
            known = ", ".join(sorted(checkers))
            raise InvalidInput(field, f"unknown field (accepted: {known})")
        if raw is not None:
            values[name] = checker(field, raw)
    return values


def _health(field: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(field, f"must be an object, not {_kind(value)}")
    return _fields(field, value, _HEALTH_FIELDS)


_SPEC_FIELDS: dict[str, Callable[[str, object], Any]] = {
    "url": _text,
    "model_id": _text,
    "worker_type": _choice(WorkerType),
    "bootstrap_port": _integer(1, 65535),
    "runtime": _choice(Runtime),
    "priority": _integer(0, 100),
    "cost": _number(minimum=0, exclusive=True),
    "labels": _labels,
    "api_key": _text,
    "health": _health,
    "max_connection_attempts": _integer(1, 10_000),
    "registration_timeout_secs": _number(minimum=0, exclusive=True),
    "recheck_interval_secs": _number(minimum=0, exclusive=False),
    "drain_timeout_secs": _number(minimum=0, exclusive=False),
}

_PATCH_FIELDS: dict[str, Callable[[str, object], Any]] = {
    "priority": _SPEC_FIELDS["priority"],
    "cost": _SPEC_FIELDS["cost"],
    "labels": lambda field, value: _labels(field, value, allow_null=True),
    "api_key": _text,
    "health": _health,
}


def parse_worker_spec(data: Mapping[str, Any]) -> WorkerSpec:
    """A full WorkerSpec (POST and PUT bodies)."""
    values = _fields("", data, _SPEC_FIELDS)
    if "url" not in values:
        raise InvalidInput("url", "is required")
    values["url"] = parse_worker_url(values["url"])
    if "bootstrap_port" in values and values.get("worker_type") is not WorkerType.PREFILL:
        raise InvalidInput("bootstrap_port", "is only accepted with worker_type prefill")
    if "health" in values:
        values["health"] = HealthConfig(**values["health"])
    return WorkerSpec(**values)


def parse_worker_patch(data: Mapping[str, Any]) -> WorkerPatch:
    """A PATCH body: priority, cost, labels (merged; null removes), api_key, health (merged)."""
    if "url" in data:
        raise InvalidInput(
            "url", "cannot change with PATCH: DELETE the worker and POST the new one"
        )
    values = _fields("", data, _PATCH_FIELDS)
    if not data:
        raise InvalidInput("", "the body names no field to change")
    return WorkerPatch(**values)
