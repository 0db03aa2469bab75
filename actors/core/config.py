"""GatewayConfig: the gateway's own settings and the defaults workers inherit (pure).

A GatewayConfig checks itself when constructed (``actors/core/validation.py``'s rules: the defaults
workers inherit follow exactly the rules of the same fields of a WorkerSpec); a bad value raises
InvalidInput, a ValueError, naming the field.

The fields are the single source of their defaults and help: a field whose metadata comes from
``flag(...)`` is a ``tmg serve`` option and a config-file key (``api/cli.py`` reads its name,
type, default, help and choices from here).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from actors.core import validation as check
from actors.core.addresses import check_worker_address, parse_networks
from actors.core.errors import InvalidInput
from actors.core.model import WorkerSpec
from actors.dataplane.routing import POLICIES

T = TypeVar("T")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
FLAG = "flag"  # the metadata key of a field that is a ``tmg serve`` option


def flag(
    help: str,
    *,
    name: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Field metadata: the field is a ``tmg serve`` option, ``--<name>`` (by default the field's
    name with dashes), and a config-file key (the option's name with underscores)."""
    return {FLAG: {"help": help, "name": name, "metavar": metavar, "choices": choices}}


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    registration_concurrency: int = field(
        default=8, metadata=flag("registrations detected at once (workflow tasks)")
    )
    registration_queue_size: int = field(
        default=1024, metadata=flag("registrations waiting; beyond it POST /workers answers 503")
    )
    inbox_size: int = 1024  # envelopes waiting for the registry (asks beyond wait)
    max_connection_attempts: int = field(default=20, metadata=flag("default per worker"))
    registration_timeout_secs: float = field(default=60.0, metadata=flag("default per worker"))
    recheck_interval_secs: float = field(
        default=30.0, metadata=flag("default re-probe interval of a failed worker (0: off)")
    )
    drain_timeout_secs: float = field(default=30.0, metadata=flag("default per worker"))
    backoff_initial_secs: float = 0.1  # between detection attempts, doubling
    backoff_max_secs: float = 5.0
    ask_timeout_secs: float = 10.0  # an ask the registry does not answer in time is a 503
    policy: str = field(
        default="round_robin", metadata=flag("default routing policy", choices=POLICIES)
    )
    retries: int = field(
        default=2,
        metadata=flag("a failed inference request is retried on up to this many other workers"),
    )
    breaker_failures: int = 5  # consecutive proxy failures that open a worker's breaker
    breaker_cooldown_secs: float = 10.0  # then one probe request is let through
    upstream_connect_timeout_secs: float = field(
        default=5.0,
        metadata=flag("time to connect to a worker (TCP and TLS) before trying another"),
    )
    upstream_read_timeout_secs: float = field(
        default=300.0,
        metadata=flag(
            "time a worker may take to start its answer, and between two pieces of a stream"
        ),
    )
    allowed_networks: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            "allow worker addresses in this network although the address rules refuse it "
            "(link-local, metadata, ...); repeatable",
            name="allow-network",
            metavar="CIDR",
        ),
    )
    state: str = field(
        default=":memory:",
        metadata=flag(
            "where the registry is kept: :memory: (nothing survives the process), a SQLite "
            "file's path (created if missing, in an existing directory), or a PostgreSQL URL "
            "(postgresql://user@host/db) that every replica of the gateway shares",
            metavar="PATH|URL",
        ),
    )
    shared_state: bool = field(
        default=False,
        metadata=flag(
            "open the SQLite state file as one of several gateway processes on this host "
            "(set by tmg serve --processes; a PostgreSQL URL is always shared)"
        ),
    )
    process_label: str | None = field(
        default=None,
        metadata=flag(
            "add process=LABEL to every /metrics series (set per process by --processes)",
            metavar="LABEL",
        ),
    )
    replica_lease_secs: float = field(
        default=5.0,
        metadata=flag(
            "with PostgreSQL: a replica silent this long is gone (its jobs are taken over, "
            "it holds no drain); replicas heartbeat 5 times per lease"
        ),
    )
    # names this gateway in loop detection (the x-tmg-gateway answer header and the x-tmg-via
    # hop header) and as a replica; random per gateway
    instance_id: str = field(
        default_factory=lambda: secrets.token_hex(8),
        metadata=flag(
            "this gateway's name: in the x-tmg-gateway and x-tmg-via headers and, with "
            "PostgreSQL, as a replica (distinct per replica; default: random per start)",
            metavar="NAME",
        ),
    )

    def __post_init__(self) -> None:
        check.check_attributes(self, "", CONFIG_FIELDS)
        if self.backoff_max_secs < self.backoff_initial_secs:
            raise InvalidInput(
                "backoff_max_secs",
                f"must be at least backoff_initial_secs ({self.backoff_initial_secs:g}), "
                f"not {self.backoff_max_secs:g}",
            )
        parse_networks(self.allowed_networks)

    def check_address(self, spec: WorkerSpec) -> None:
        """InvalidInput when ``spec`` is not a WorkerSpec, or its address is one this gateway
        must not probe."""
        _require_spec(spec)
        check_worker_address(spec.url, self.allowed_networks)

    def resolve(self, spec: WorkerSpec) -> WorkerSpec:
        """The spec with every unset timing field taken from these defaults."""
        _require_spec(spec)
        if None not in (
            spec.max_connection_attempts,
            spec.registration_timeout_secs,
            spec.recheck_interval_secs,
            spec.drain_timeout_secs,
        ):
            return spec
        return replace(
            spec,
            max_connection_attempts=_pick(
                spec.max_connection_attempts, self.max_connection_attempts
            ),
            registration_timeout_secs=_pick(
                spec.registration_timeout_secs, self.registration_timeout_secs
            ),
            recheck_interval_secs=_pick(spec.recheck_interval_secs, self.recheck_interval_secs),
            drain_timeout_secs=_pick(spec.drain_timeout_secs, self.drain_timeout_secs),
        )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        doublings = min(max(attempt - 1, 0), 64)  # 2**1024 would not fit in a float
        return float(min(self.backoff_initial_secs * 2.0**doublings, self.backoff_max_secs))


def _state(field: str, value: object) -> str:
    """``:memory:`` or a file path (the store checks the file itself when it opens it)."""
    text = check.text(field, value)
    if not text or "\x00" in text:
        raise InvalidInput(field, "must be :memory: or a file path")
    return text


def _boolean(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(field, f"must be true or false, not {check.kind(value)}")
    return value


def _optional_label(field: str, value: object) -> str | None:
    if value is None:
        return None
    return _instance_id(field, value)


def _instance_id(field: str, value: object) -> str:
    """Sent in the x-tmg-via hop header and the x-tmg-gateway answer header: a short token."""
    text = check.text(field, value)
    if not _INSTANCE_ID.fullmatch(text):
        raise InvalidInput(field, "must be 1 to 64 ASCII letters, digits, '.', '_' or '-'")
    return text


CONFIG_FIELDS: dict[str, check.Checker] = {
    "registration_concurrency": check.integer(1, 10_000),
    "registration_queue_size": check.integer(1, 1_000_000),
    "inbox_size": check.integer(1, 1_000_000),
    **check.WORKER_DEFAULTS,  # exactly the rules of the same WorkerSpec fields
    "backoff_initial_secs": check.seconds(check.MIN_BACKOFF_SECS),
    "backoff_max_secs": check.seconds(check.MIN_BACKOFF_SECS),
    "ask_timeout_secs": check.seconds(check.MIN_TIMEOUT_SECS),
    "policy": check.one_of(POLICIES),
    "retries": check.integer(0, 100),
    "breaker_failures": check.integer(1, 1_000_000),
    "breaker_cooldown_secs": check.seconds(check.MIN_TIMEOUT_SECS),
    "upstream_connect_timeout_secs": check.seconds(check.MIN_TIMEOUT_SECS),
    "upstream_read_timeout_secs": check.seconds(check.MIN_TIMEOUT_SECS),
    "allowed_networks": check.string_list,
    "state": _state,
    "replica_lease_secs": check.seconds(check.MIN_TIMEOUT_SECS),
    "shared_state": _boolean,
    "process_label": _optional_label,
    "instance_id": _instance_id,
}


def _require_spec(spec: object) -> None:
    check.require_instance("spec", spec, WorkerSpec, "build one with worker_spec(url, ...)")


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value
