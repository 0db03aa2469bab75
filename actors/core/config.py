"""GatewayConfig: the gateway's own settings and the defaults workers inherit (pure).

A GatewayConfig checks itself when constructed (``actors/core/validation.py``'s rules: the defaults
workers inherit follow exactly the rules of the same fields of a WorkerSpec); a bad value raises
InvalidInput, a ValueError, naming the field.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace
from typing import TypeVar

from actors.core import validation as check
from actors.core.addresses import check_worker_address, parse_networks
from actors.core.errors import InvalidInput
from actors.core.model import WorkerSpec
from actors.dataplane.routing import POLICIES

T = TypeVar("T")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    registration_concurrency: int = 8  # workflow tasks running detection at once
    registration_queue_size: int = 1024  # jobs waiting; when full, POST answers 503
    inbox_size: int = 1024  # envelopes waiting for the registry (asks beyond wait)
    max_connection_attempts: int = 20
    registration_timeout_secs: float = 60.0
    recheck_interval_secs: float = 30.0  # re-probe of a failed worker; 0 turns it off
    drain_timeout_secs: float = 30.0
    backoff_initial_secs: float = 0.1  # between detection attempts, doubling
    backoff_max_secs: float = 5.0
    ask_timeout_secs: float = 10.0  # an ask the registry does not answer in time is a 503
    policy: str = "round_robin"  # the default routing policy (actors/dataplane/routing.py)
    retries: int = 2  # a failed proxied request is retried on up to this many other workers
    breaker_failures: int = 5  # consecutive proxy failures that open a worker's breaker
    breaker_cooldown_secs: float = 10.0  # then one probe request is let through
    upstream_connect_timeout_secs: float = 5.0  # connecting to a worker (TCP and TLS)
    upstream_read_timeout_secs: float = 300.0  # a worker's response head, and each body gap
    # networks a worker address may lie in although the address rules refuse them by default
    # (link-local, cloud metadata, ...): CIDR strings such as "169.254.10.0/24"
    allowed_networks: tuple[str, ...] = ()
    # names this gateway in loop detection (the x-tmg-gateway answer header and the x-tmg-via
    # hop header); random per gateway
    instance_id: str = field(default_factory=lambda: secrets.token_hex(8))

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
    "instance_id": _instance_id,
}


def _require_spec(spec: object) -> None:
    check.require_instance("spec", spec, WorkerSpec, "build one with worker_spec(url, ...)")


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value
