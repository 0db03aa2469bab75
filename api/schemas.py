"""Strict parsing of request bodies into domain values (JSON → WorkerSpec / WorkerPatch).

Every problem is an InvalidInput naming the field (dotted for nested ones: ``health.timeout_secs``
or ``labels.zone``). Unknown fields, nested ones included, are refused, never ignored. A body is
validated once, by the value it becomes: ``WorkerSpec`` and ``WorkerPatch`` check their fields
with the body models of ``actors/core/model.py`` (``WorkerSpecBody``, ``WorkerPatchBody``), the
same models the OpenAPI document is made from, so the API, the library and the document cannot
differ. A ``null`` field means "not given".

A body is parsed with limits of its own, each a 400 that names the problem in plain words (never
an interpreter message): at most ``MAX_JSON_DEPTH`` levels of nesting, and no number longer than
``MAX_NUMBER_CHARS`` characters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from actors.core import validation as check
from actors.core.errors import InvalidInput
from actors.core.model import PATCH_FIELDS, SPEC_FIELDS, WorkerPatch, WorkerSpec

MAX_JSON_DEPTH = 32  # levels of objects and arrays in a management body (the top one counts)
MAX_NUMBER_CHARS = 100  # digits, sign, point and exponent of one JSON number

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "PATCH_FIELDS",
    "SPEC_FIELDS",
    "load_json_object",
    "parse_worker_patch",
    "parse_worker_spec",
]


class _Refused(ValueError):
    """A body refused by one of our own parse hooks; its message is meant for the client."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON")


def _number(parse: type[int] | type[float]) -> Any:
    def convert(literal: str) -> int | float:
        if len(literal) > MAX_NUMBER_CHARS:
            raise _Refused(
                f"a number in the body has too many digits (at most {MAX_NUMBER_CHARS} characters)"
            )
        return parse(literal)

    return convert


_parse_int = _number(int)
_parse_float = _number(float)


def load_json_object(body: bytes | str) -> dict[str, Any]:
    """Parse a request body that must be a JSON object."""
    too_deep = InvalidInput("", f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    try:
        data = json.loads(
            body,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except RecursionError:  # the decoder recurses per level: far deeper than we accept anyway
        raise too_deep from None
    except json.JSONDecodeError as error:  # its message says what and where, nothing internal
        raise InvalidInput("", f"the body is not valid JSON: {error}") from None
    except _Refused as error:
        raise InvalidInput("", f"the body is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise InvalidInput("", "the body is not valid JSON: it is not UTF-8 text") from None
    except ValueError:  # anything else the decoder says may name interpreter internals
        raise InvalidInput("", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("", f"the body must be a JSON object, not {check.kind(data)}")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def json_depth(value: object) -> int:
    """Levels of nested objects and arrays in a decoded JSON value (a scalar is 0), counted
    without recursion."""
    deepest = 0
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def parse_worker_spec(data: Mapping[str, Any]) -> WorkerSpec:
    """A full WorkerSpec (POST and PUT bodies)."""
    values = _known_fields(data, SPEC_FIELDS)
    if "url" not in values:
        raise InvalidInput("url", "is required")
    return WorkerSpec(**values)


def parse_worker_patch(data: Mapping[str, Any]) -> WorkerPatch:
    """A PATCH body: priority, cost, labels (merged; null removes), api_key, health (merged)."""
    if "url" in data:
        raise InvalidInput(
            "url", "cannot change with PATCH: DELETE the worker and POST the new one"
        )
    values = _known_fields(data, PATCH_FIELDS)
    if not data:
        raise InvalidInput("", "the body names no field to change")
    return WorkerPatch(**values)


def _known_fields(data: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """The body's non-null top-level fields, after refusing any name the body model does not
    have (the value's constructor validates the rest, nested unknown names included)."""
    for name in data:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise InvalidInput(name, f"unknown field (accepted: {known})")
    return {name: value for name, value in data.items() if value is not None}
