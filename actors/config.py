"""GatewayConfig: the gateway's own settings and the defaults workers inherit (pure)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import TypeVar

from actors.addresses import check_worker_address, parse_networks
from actors.model import WorkerSpec

T = TypeVar("T")


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
    policy: str = "round_robin"  # the default routing policy (actors/routing.py)
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
        for name in ("registration_concurrency", "registration_queue_size", "inbox_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connection_attempts < 1:
            raise ValueError("max_connection_attempts must be at least 1")
        if self.retries < 0 or self.breaker_failures < 1:
            raise ValueError("retries must be at least 0 and breaker_failures at least 1")
        parse_networks(self.allowed_networks)

    def check_address(self, spec: WorkerSpec) -> None:
        """InvalidInput when the spec's address is one this gateway must not probe."""
        check_worker_address(spec.url, self.allowed_networks)

    def resolve(self, spec: WorkerSpec) -> WorkerSpec:
        """The spec with every unset timing field taken from these defaults."""
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
        return float(min(self.backoff_initial_secs * 2 ** (attempt - 1), self.backoff_max_secs))


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value
