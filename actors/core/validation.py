"""The rules a value from outside must pass before the gateway takes it (pure).

One definition serves every door: the HTTP API (``api/schemas.py``), the values a library caller
builds (``WorkerSpec``, ``HealthConfig``, ``WorkerPatch`` and ``GatewayConfig`` check themselves
in ``__post_init__``) and the command line (which builds a ``GatewayConfig``). A checker takes
the field's name (dotted when nested: ``health.timeout_secs``) and the raw value, and returns the
value to keep or raises ``InvalidInput`` naming the field. Messages never echo a secret, and
never show more than a short excerpt of what was sent.

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
from typing import Any, TypeVar

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


def secret_token(field: str, value: object) -> str:
    """A credential sent as ``Authorization: Bearer <value>``: printable ASCII, no spaces. The
    message never quotes it."""
    checked = text(field, value)
    if not all("!" <= char <= "~" for char in checked):
        raise InvalidInput(
            field,
            "must be printable ASCII without spaces or control characters "
            "(it is sent as an Authorization: Bearer header)",
        )
    return checked


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


def number(low: float, high: float = MAX_SECONDS, *, above: bool = False) -> Checker:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``above``), kept as a float.
    Bounds are compared before any conversion, so a huge integer cannot overflow."""
    bounds = f"above {low:g} and at most {high:g}" if above else f"from {low:g} to {high:g}"

    def check(field: str, value: object) -> float:
        real = _real(field, value)
        fits = (real > low if above else real >= low) and real <= high  # NaN fits nowhere
        if not fits:
            raise InvalidInput(field, f"must be a finite number {bounds}, not {shown(value)}")
        return float(real)

    return check


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


def boolean(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(field, f"must be true or false, not {kind(value)}")
    return value


def choice(enum: type[E]) -> Callable[[str, object], E]:
    """A member of ``enum``, or its string value."""

    def check(field: str, value: object) -> E:
        if isinstance(value, enum):
            return value
        allowed = [member.value for member in enum]
        if not isinstance(value, str) or value not in allowed:
            raise InvalidInput(field, f"must be one of {', '.join(allowed)}, not {shown(value)}")
        return enum(value)

    return check


def one_of(allowed: tuple[str, ...]) -> Checker:
    def check(field: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise InvalidInput(field, f"must be one of {', '.join(allowed)}, not {shown(value)}")
        return value

    return check


def optional(checker: Callable[[str, object], T]) -> Callable[[str, object], T | None]:
    """``checker``, or None (the field is unset)."""

    def check(field: str, value: object) -> T | None:
        return None if value is None else checker(field, value)

    return check


def labels(field: str, value: object, *, allow_null: bool = False) -> dict[str, Any]:
    """Operator labels: string keys and values (a PATCH may set a value to null: remove it)."""
    if not isinstance(value, Mapping):
        raise InvalidInput(field, f"must be an object of strings, not {kind(value)}")
    if len(value) > MAX_LABELS:
        raise InvalidInput(field, f"has {len(value)} labels; at most {MAX_LABELS} are accepted")
    for key, item in value.items():
        if not isinstance(key, str):
            raise InvalidInput(field, f"keys must be strings, not {kind(key)}")
        if not key or utf8_size(field, key) > MAX_LABEL_KEY_BYTES:
            raise InvalidInput(field, f"keys must be 1 to {MAX_LABEL_KEY_BYTES} bytes")
        if item is None and allow_null:
            continue
        if not isinstance(item, str):
            raise InvalidInput(f"{field}.{key}", f"must be a string, not {kind(item)}")
        if utf8_size(f"{field}.{key}", item) > MAX_LABEL_VALUE_BYTES:
            raise InvalidInput(f"{field}.{key}", f"is longer than {MAX_LABEL_VALUE_BYTES} bytes")
    return dict(value)


def patch_labels(field: str, value: object) -> dict[str, Any]:
    return labels(field, value, allow_null=True)


def string_list(field: str, value: object) -> tuple[str, ...]:
    """A list (or tuple) of strings, kept as a tuple; a lone string is refused, not split."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidInput(field, f"must be a list of strings, not {kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise InvalidInput(field, f"must be a list of strings, not a list with {kind(item)}")
    return tuple(value)


# The timing fields a WorkerSpec sets and GatewayConfig gives defaults for: one rule for both.
WORKER_DEFAULTS: dict[str, Checker] = {
    "max_connection_attempts": integer(1, MAX_ATTEMPTS),
    "registration_timeout_secs": seconds(MIN_TIMEOUT_SECS),
    "recheck_interval_secs": seconds(MIN_RECHECK_INTERVAL_SECS, zero_turns_off=True),
    "drain_timeout_secs": seconds(0),
}


# ---- whole objects -------------------------------------------------------------------------


def check_mapping(where: str, data: object, checkers: Mapping[str, Checker]) -> dict[str, Any]:
    """The fields of a JSON-like object: unknown names are refused, never ignored; a null value
    means "not given" and is dropped; every other value is checked."""
    if not isinstance(data, Mapping):
        raise InvalidInput(where, f"must be an object, not {kind(data)}")
    values = {}
    for name, raw in data.items():
        field = dotted(where, str(name))
        checker = checkers.get(name) if isinstance(name, str) else None
        if checker is None:
            known = ", ".join(sorted(checkers))
            raise InvalidInput(field, f"unknown field (accepted: {known})")
        if raw is not None:
            values[name] = checker(field, raw)
    return values


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
