"""Pure values: worker specs, worker records, job status (frozen dataclasses).

A ``WorkerSpec`` is what an operator asked for; a ``Worker`` is the registry's record of it: the
spec, what detection found, the lifecycle status and the status of the job working on it.
Mappings held by these values are never mutated after construction: changes make new values.

The values a caller builds (``WorkerSpec``, ``HealthConfig``, ``WorkerPatch``) check themselves
when constructed, with the rules of ``actors/core/validation.py`` that the HTTP API uses too:
a string URL is parsed, an enum field takes its string value, a bad value raises
``InvalidInput`` naming the field. So an actor only ever sees a valid spec. ``SPEC_FIELDS``,
``HEALTH_FIELDS`` and ``PATCH_FIELDS`` are those rules, one checker per field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from actors.core import validation as check
from actors.core.errors import InvalidInput, PreconditionFailed
from actors.core.urls import WorkerUrl, parse_worker_url

WorkerId = str


class WorkerStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class WorkerType(StrEnum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


class ConnectionMode(StrEnum):
    HTTP = "http"
    GRPC = "grpc"


class Runtime(StrEnum):
    SGLANG = "sglang"
    VLLM = "vllm"
    TRTLLM = "trtllm"
    EXTERNAL = "external"


class JobType(StrEnum):
    ADD = "AddWorker"
    REPLACE = "ReplaceWorker"
    RETRY = "RetryWorker"
    RECHECK = "RecheckWorker"
    REMOVE = "RemoveWorker"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    timeout_secs: float = 5.0
    check_interval_secs: float = 10.0
    failure_threshold: int = 3
    success_threshold: int = 2
    disable: bool = False
    drain_settle_secs: float = 0.0

    def __post_init__(self) -> None:
        # always named as the ``health`` of a spec or patch: the same name the API gives it
        check.check_attributes(self, "health", HEALTH_FIELDS)


HEALTH_FIELDS: dict[str, check.Checker] = {
    "timeout_secs": check.seconds(check.MIN_TIMEOUT_SECS),
    "check_interval_secs": check.seconds(check.MIN_CHECK_INTERVAL_SECS),
    "failure_threshold": check.integer(1, check.MAX_THRESHOLD),
    "success_threshold": check.integer(1, check.MAX_THRESHOLD),
    "disable": check.boolean,
    "drain_settle_secs": check.seconds(0),
}


def _health(field: str, value: object) -> HealthConfig:
    """A HealthConfig, or a mapping of its fields (unknown names refused; null: the default)."""
    if isinstance(value, HealthConfig):
        return value
    return HealthConfig(**check.check_mapping(field, value, HEALTH_FIELDS))


def _url(field: str, value: object) -> WorkerUrl:
    """A URL string is parsed; a WorkerUrl is parsed again from its text, so one built by hand
    is canonical (or refused) too."""
    if isinstance(value, WorkerUrl):
        if not isinstance(value.scheme, str | None) or not isinstance(value.host, str):
            raise InvalidInput(field, "must have a string host (build it with parse_worker_url)")
        return parse_worker_url(value.text)
    return parse_worker_url(check.text(field, value))


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """What an operator asks for. ``None`` timing fields take the gateway's defaults.

    ``url`` may be given as a string (``WorkerSpec(url="127.0.0.1:8000")``): it is parsed and the
    WorkerUrl kept. Enum fields take their string values; ``health`` may be a mapping.
    """

    url: WorkerUrl
    model_id: str | None = None
    worker_type: WorkerType = WorkerType.REGULAR
    bootstrap_port: int | None = None
    runtime: Runtime | None = None
    priority: int = 50
    cost: float = 1.0
    labels: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)
    health: HealthConfig = field(default_factory=HealthConfig)
    max_connection_attempts: int | None = None
    registration_timeout_secs: float | None = None
    recheck_interval_secs: float | None = None
    drain_timeout_secs: float | None = None

    def __post_init__(self) -> None:
        check.check_attributes(self, "", SPEC_FIELDS)
        if self.bootstrap_port is not None and self.worker_type is not WorkerType.PREFILL:
            raise InvalidInput("bootstrap_port", "is only accepted with worker_type prefill")


SPEC_FIELDS: dict[str, check.Checker] = {
    "url": _url,
    "model_id": check.optional(check.text),
    "worker_type": check.choice(WorkerType),
    "bootstrap_port": check.optional(check.integer(1, 65535)),
    "runtime": check.optional(check.choice(Runtime)),
    "priority": check.integer(0, 100),
    "cost": check.number(0, above=True),
    "labels": check.labels,
    "api_key": check.optional(check.secret_token),
    "health": _health,
    # None: the gateway's default (GatewayConfig checks those with the same rules)
    **{name: check.optional(rule) for name, rule in check.WORKER_DEFAULTS.items()},
}


def _health_changes(field: str, value: object) -> dict[str, Any]:
    return check.check_mapping(field, value, HEALTH_FIELDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerPatch:
    """A PATCH: only the fields that are not None change. A label set to None is removed.
    ``health`` maps HealthConfig field names to new values (unknown names are refused)."""

    priority: int | None = None
    cost: float | None = None
    labels: Mapping[str, str | None] | None = None
    api_key: str | None = field(default=None, repr=False)
    health: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        check.check_attributes(self, "", PATCH_FIELDS)

    def apply(self, spec: WorkerSpec) -> WorkerSpec:
        changes: dict[str, Any] = {}
        if self.priority is not None:
            changes["priority"] = self.priority
        if self.cost is not None:
            changes["cost"] = self.cost
        if self.api_key is not None:
            changes["api_key"] = self.api_key
        if self.labels is not None:
            labels = dict(spec.labels)
            for key, value in self.labels.items():
                if value is None:
                    labels.pop(key, None)
                else:
                    labels[key] = value
            changes["labels"] = labels
        if self.health is not None:
            changes["health"] = replace(spec.health, **self.health)
        return replace(spec, **changes)


PATCH_FIELDS: dict[str, check.Checker] = {
    name: check.optional(checker)
    for name, checker in {
        "priority": SPEC_FIELDS["priority"],
        "cost": SPEC_FIELDS["cost"],
        "labels": check.patch_labels,
        "api_key": check.secret_token,
        "health": _health_changes,
    }.items()
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    id: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    """What probing a worker found: its scheme, protocol, runtime, models and info labels."""

    url: WorkerUrl
    connection_mode: ConnectionMode
    runtime: Runtime
    models: tuple[ModelCard, ...]
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_ids(self) -> frozenset[str]:
        return frozenset(model.id for model in self.models)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    job_id: int
    job_type: JobType
    state: JobState
    message: str | None = None
    attempts: int = 0
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True, slots=True, kw_only=True)
class Worker:
    id: WorkerId
    spec: WorkerSpec
    status: WorkerStatus
    created_at: float
    updated_at: float
    spec_version: int = 1
    detection: Detection | None = None
    is_healthy: bool = False
    job: JobStatus | None = None

    @property
    def url(self) -> WorkerUrl:
        """The address with the scheme detection chose (a bare spec gets one when detected)."""
        return self.detection.url if self.detection is not None else self.spec.url

    @property
    def key(self) -> str:
        return self.spec.url.key

    @property
    def model_ids(self) -> frozenset[str]:
        return self.detection.model_ids if self.detection is not None else frozenset()

    @property
    def connection_mode(self) -> ConnectionMode | None:
        if self.detection is not None:
            return self.detection.connection_mode
        if self.spec.url.scheme is None:
            return None
        return ConnectionMode.GRPC if self.spec.url.is_grpc else ConnectionMode.HTTP

    @property
    def runtime(self) -> Runtime | None:
        return self.detection.runtime if self.detection is not None else self.spec.runtime

    @property
    def labels(self) -> dict[str, str]:
        """Detected labels overlaid by the operator's labels."""
        detected = self.detection.labels if self.detection is not None else {}
        return {**detected, **self.spec.labels}

    @classmethod
    def pending(cls, *, id: WorkerId, spec: WorkerSpec, job: JobStatus, now: float) -> Worker:
        """A new registration: waiting for its job's detection."""
        return cls(
            id=id, spec=spec, status=WorkerStatus.PENDING, created_at=now, updated_at=now, job=job
        )

    def require_version(self, if_match: int | None) -> None:
        """An If-Match that names another spec version is refused (412)."""
        if if_match is not None and if_match != self.spec_version:
            raise PreconditionFailed(self.id, if_match, self.spec_version)

    @property
    def is_routable(self) -> bool:
        return self.status is WorkerStatus.READY and self.is_healthy
