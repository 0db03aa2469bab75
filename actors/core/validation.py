"""The rules a value from outside must pass before the gateway takes it (pure).

The worker bodies (``WorkerSpec``, its ``health``, the PATCH body) are defined once, as pydantic
models in ``actors/core/model.py``; ``validate`` applies one and turns pydantic's first error into
an ``InvalidInput`` in the gateway's words (``refusal``), written from the field's JSON Schema, so
what a refusal says a field must be is what the OpenAPI document says. ``GatewayConfig`` and the
command line use the checkers below: a checker takes the field's name (dotted when nested:
``health.timeout_secs``) and the raw value, and returns the value to keep or raises
``InvalidInput`` naming the field; ``WORKER_DEFAULTS`` are the spec's own fields as checkers
(``field_checker``). Messages never echo a secret, and never show more than a short excerpt of
what was sent.

Bounds, and why (README "Limits"):

* Every duration is at most ``MAX_SECONDS`` (1e9 s, about 32 years): beyond that it is a typo.
* ``MIN_TIMEOUT_SECS`` (0.01 s) for every timeout: no network exchange finishes reliably faster,
  so a smaller timeout only ever fails.
* ``MIN_CHECK_INTERVAL_SECS`` (0.1 s) between two health probes of a worker: at most ten probes a
  second per worker, each waiting for its answer; smaller intervals turned the prober into a busy
  loop (63-94 % CPU at 1e-9).
* ``MIN_RECHECK_INTERVAL_SECS`` (1 s) between two re-probes of a failed worker, or 0 for none:
  each recheck is a registration job that logs a warning when the worker is still down, so a
  smaller interval floods the log (thousands of lines a second at 1e-9).
* ``MIN_BACKOFF_SECS`` (0.001 s) between detection attempts: only the library sets it (tests
  retry fast); the number of attempts is bounded by ``MAX_ATTEMPTS`` and the registration
  timeout anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from functools import cache
from typing import Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from actors.core.errors import InvalidInput

MAX_SECONDS = 1e9
MIN_TIMEOUT_SECS = 0.01
MIN_CHECK_INTERVAL_SECS = 0.1
MIN_RECHECK_INTERVAL_SECS = 1.0
MIN_BACKOFF_SECS = 0.001
MAX_ATTEMPTS = 10_000
MAX_THRESHOLD = 1000
MAX_LABELS = 128
MAX_LABEL_KEY_BYTES = 256
MAX_LABEL_VALUE_BYTES = 4096
MAX_TEXT_BYTES = 4096
_SHOWN_CHARS = 40  # at most this much of a refused value is quoted back

Checker = Callable[[str, object], Any]
E = TypeVar("E", bound=Enum)
T = TypeVar("T")


# ---- how refused values are described ------------------------------------------------------


def kind(value: object) -> str:
    """A JSON-flavoured name for the type of ``value``: "an integer", "an object", ..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Enum):
        return type(value).__name__
    for types, name in (
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list | tuple, "an array"),
        (Mapping, "an object"),
        (type(None), "null"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


def shown(value: object) -> str:
    """A short excerpt of a refused value for a message (never a whole huge one)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return "a very large integer"  # repr of a 5,000-digit int even raises ValueError
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# ---- checkers ------------------------------------------------------------------------------


def utf8_size(field: str, value: str) -> int:
    """UTF-8 length; a string with a lone surrogate (JSON can encode one) is refused."""
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise InvalidInput(field, "is not valid Unicode text (lone surrogate)") from None


def text(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {kind(value)}")
    if not value:
        raise InvalidInput(field, "must not be empty")
    if utf8_size(field, value) > MAX_TEXT_BYTES:
        raise InvalidInput(field, f"is longer than {MAX_TEXT_BYTES} bytes")
    return value


def integer(low: int, high: int) -> Checker:
    def check(field: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(field, f"must be an integer, not {kind(value)}")
        if not low <= value <= high:
            raise InvalidInput(field, f"must be between {low} and {high}, not {shown(value)}")
        return int(value)

    return check


def _real(field: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, f"must be a number, not {kind(value)}")
    return value


def seconds(minimum: float, *, zero_turns_off: bool = False) -> Checker:
    """A duration of at least ``minimum`` seconds (at most MAX_SECONDS); with
    ``zero_turns_off`` also exactly 0, which switches the periodic thing off."""

    def check(field: str, value: object) -> float:
        real = _real(field, value)
        if zero_turns_off and real == 0:
            return 0.0
        if not (minimum <= real <= MAX_SECONDS):
            off = "0 (off) or " if zero_turns_off else ""
            raise InvalidInput(
                field,
                f"must be {off}a number of seconds from {minimum:g} to {MAX_SECONDS:g}, "
                f"not {shown(value)}",
            )
        return float(real)

    return check


def one_of(allowed: tuple[str, ...]) -> Checker:
    def check(field: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise InvalidInput(field, f"must be one of {', '.join(allowed)}, not {shown(value)}")
        return value

    return check


def string_list(field: str, value: object) -> tuple[str, ...]:
    """A list (or tuple) of strings, kept as a tuple; a lone string is refused, not split."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidInput(field, f"must be a list of strings, not {kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise InvalidInput(field, f"must be a list of strings, not a list with {kind(item)}")
    return tuple(value)


# The timing fields a WorkerSpec sets and GatewayConfig gives defaults for: the spec's fields.
WORKER_DEFAULT_NAMES = (
    "max_connection_attempts",
    "registration_timeout_secs",
    "recheck_interval_secs",
    "drain_timeout_secs",
)


def __getattr__(name: str) -> dict[str, Checker]:
    """``WORKER_DEFAULTS``: a checker per WorkerSpec timing field, made from the spec's body
    model (imported late: the model imports this module)."""
    if name == "WORKER_DEFAULTS":
        from actors.core.model import WorkerSpecBody

        return {field: field_checker(WorkerSpecBody, field) for field in WORKER_DEFAULT_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- whole objects -------------------------------------------------------------------------


def check_attributes(instance: object, where: str, checkers: Mapping[str, Checker]) -> None:
    """For a frozen dataclass's ``__post_init__``: check every field and keep what the checker
    returns (a parsed URL, an enum member, a float for an int, a private copy of a mapping)."""
    for name, checker in checkers.items():
        value = getattr(instance, name)
        checked = checker(dotted(where, name), value)
        if checked is not value:
            object.__setattr__(instance, name, checked)


def require_instance(field: str, value: object, expected: type[T], hint: str = "") -> T:
    """``value`` itself when it is an ``expected``; else InvalidInput (for the library's entry
    points, which must not hand anything else to an actor)."""
    if not isinstance(value, expected):
        advice = f" ({hint})" if hint else ""
        raise InvalidInput(
            field, f"must be a {expected.__name__}{advice}, not {type(value).__name__}"
        )
    return value


def require_worker_id(value: object) -> str:
    """A worker id given to the library must be a string (an unhashable one would reach the
    registry's table)."""
    if not isinstance(value, str):
        raise InvalidInput("worker_id", f"must be a string, not {kind(value)}")
    return value


# ---- bodies defined as pydantic models ----------------------------------------------------


def at_most_bytes(limit: int) -> Any:
    """A pydantic validator: at most ``limit`` bytes of UTF-8 (the schema's maxLength counts
    characters, so it says the same number and never allows more)."""

    def check(value: str) -> str:
        if len(value.encode()) > limit:  # a lone surrogate never gets here (string_unicode)
            raise PydanticCustomError(
                "utf8_too_long", "is longer than {limit} bytes", {"limit": limit}
            )
        return value

    return AfterValidator(check)


def validate(model: type[BaseModel], values: dict[str, Any], where: str = "") -> BaseModel:
    """``values`` as ``model``, or the first problem as an InvalidInput (field dotted under
    ``where``)."""
    try:
        return model.__pydantic_validator__.validate_python(values)  # type: ignore[no-any-return]
    except ValidationError as error:
        raise refusal(model, error.errors(include_url=False)[0], where) from None


def field_checker(model: type[BaseModel], name: str) -> Callable[[str, object], Any]:
    """A checker ``(field, value) -> value`` for one field of ``model`` (None refused): for
    values kept outside a body with the same rules, such as GatewayConfig's worker defaults."""
    annotation: Any = model.model_fields[name].annotation
    adapter: TypeAdapter[Any] = TypeAdapter(
        annotation, config=ConfigDict(strict=True, allow_inf_nan=False)
    )

    def check(field: str, value: object) -> Any:
        if value is None:
            schema = _schema(model)
            words = describe(schema, schema["properties"][name], name)
            raise InvalidInput(field, f"must be {words}, not null")
        try:
            return adapter.validate_python(value)
        except ValidationError as error:
            detail = error.errors(include_url=False)[0]
            detail["loc"] = (name, *detail["loc"])
            raise refusal(model, detail, field.removesuffix(name).removesuffix(".")) from None

    return check


@cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


_TYPE_ERRORS = {"int_type", "float_type", "string_type", "bool_type", "dict_type", "model_type"}


def refusal(model: type[BaseModel], error: ErrorDetails, where: str = "") -> InvalidInput:
    """One pydantic error as the gateway's InvalidInput: the field dotted, the message in the
    gateway's words, written from the field's JSON Schema (never echoing a secret)."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidInput):  # a rule checked by code names its field itself
        return cause
    root = _schema(model)
    path, schema, is_key = _locate(root, error["loc"])
    value, kind_of_error = error["input"], error["type"]
    field = dotted(where, ".".join(path))
    if kind_of_error == "extra_forbidden":
        known = ", ".join(sorted(schema.get("properties", {})))
        return InvalidInput(
            dotted(field, str(error["loc"][-1])), f"unknown field (accepted: {known})"
        )
    if kind_of_error == "missing":
        return InvalidInput(dotted(field, str(error["loc"][-1])), "is required")
    if kind_of_error == "string_unicode":
        return InvalidInput(field, "is not valid Unicode text (lone surrogate)")
    if is_key:
        if kind_of_error == "string_type":
            return InvalidInput(field, f"keys must be strings, not {kind(value)}")
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        return InvalidInput(field, f"keys must be {low} to {high} bytes")
    if kind_of_error == "too_long" and schema.get("type") == "object":
        limit = schema.get("maxProperties")
        return InvalidInput(field, f"has {len(value)} labels; at most {limit} are accepted")
    if kind_of_error in ("utf8_too_long", "string_too_long", "too_long"):
        return InvalidInput(field, f"is longer than {schema.get('maxLength')} bytes")
    if kind_of_error == "string_too_short" and schema.get("minLength") == 1:
        return InvalidInput(field, "must not be empty")
    words = describe(root, schema, path[-1] if path else "")
    secret = schema.get("writeOnly", False)
    wrong_type = kind_of_error in _TYPE_ERRORS and not (
        kind_of_error == "float_type" and isinstance(value, int) and not isinstance(value, bool)
    )
    if wrong_type:
        return InvalidInput(field, f"must be {words}, not {kind(value)}")
    return InvalidInput(
        field, f"must be {words}" if secret else f"must be {words}, not {shown(value)}"
    )


def _resolve(root: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a $ref, and a nullable anyOf with a single other branch."""
    while True:
        if "$ref" in schema:
            schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
            continue
        branches = [item for item in schema.get("anyOf", ()) if item != {"type": "null"}]
        if len(branches) == 1:
            schema = {**{k: v for k, v in schema.items() if k != "anyOf"}, **branches[0]}
            continue
        return schema


def _locate(
    root: dict[str, Any], loc: tuple[int | str, ...]
) -> tuple[list[str], dict[str, Any], bool]:
    """The JSON names along ``loc`` (pydantic's union tags dropped), the schema where they lead
    (for an unknown field: the object's), and whether the error is about a mapping's key (then
    the schema is the mapping's ``propertyNames``)."""
    path: list[str] = []
    schema = parent = _resolve(root, root)
    for part in loc:
        if part == "[key]":
            return path[:-1], _resolve(root, parent.get("propertyNames", {})), True
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        if isinstance(part, str) and part in properties:
            parent, schema = schema, _resolve(root, properties[part])
        elif isinstance(extra, dict):
            parent, schema = schema, _resolve(root, extra)
        else:
            break
        path.append(str(part))
    return path, schema, False


def describe(root: dict[str, Any], schema: dict[str, Any], name: str = "") -> str:
    """What a value under ``schema`` must be, in words ("an integer from 0 to 100")."""
    schema = _resolve(root, schema)
    if "anyOf" in schema:
        branches = [item for item in schema["anyOf"] if item != {"type": "null"}]
        return " or ".join(describe(root, item, name) for item in branches)
    if "enum" in schema:
        return "one of " + ", ".join(str(item) for item in schema["enum"])
    low, high = schema.get("minimum"), schema.get("maximum")
    match schema.get("type"):
        case "boolean":
            return "true or false"
        case "integer":
            return f"an integer from {low} to {high}"
        case "number" if low is not None and low == high:
            return f"{low:g} ({schema['title']})" if "title" in schema else f"{low:g}"
        case "number":
            unit = "a number of seconds" if name.endswith("_secs") else "a number"
            if "exclusiveMinimum" in schema:
                return f"{unit} above {schema['exclusiveMinimum']:g} and at most {high:g}"
            return f"{unit} from {low:g} to {high:g}"
        case "string" if "pattern" in schema:
            return str(schema.get("description", f"a string matching {schema['pattern']}"))
        case "string":
            return "a string"
        case "object" if isinstance(schema.get("additionalProperties"), dict):
            return "an object of strings"
        case _:
            return "an object"
