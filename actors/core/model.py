"""Pure values: worker specs, worker records, job status (frozen dataclasses).

A ``WorkerSpec`` is what an operator asked for; a ``Worker`` is the registry's record of it: the
spec, what detection found, the lifecycle status and the status of the job working on it.
Mappings held by these values are never mutated after construction: changes make new values.

The values a caller builds (``WorkerSpec``, ``HealthConfig``, ``WorkerPatch``) check themselves
when constructed, with the body models defined here (``WorkerSpecBody``, ``HealthBody``,
``WorkerPatchBody``), which the HTTP API parses with and the OpenAPI document is made from: a
string URL is parsed, an enum field takes its string value, a bad value raises ``InvalidInput``
naming the field. So an actor only ever sees a valid spec. ``SPEC_FIELDS``, ``HEALTH_FIELDS``
and ``PATCH_FIELDS`` are the field names of each body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import StrEnum
from functools import cache, partial
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.functional_validators import AfterValidator

from actors.core import validation as check
from actors.core.errors import InvalidInput, PreconditionFailed
from actors.core.urls import MAX_URL_BYTES, WorkerUrl, parse_worker_url

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


# ---- the bodies: each defined once ------------------------------------------------------------
#
# These pydantic models are the only definition of the worker bodies. The HTTP API parses with
# them (api/schemas.py), the values below validate their fields with them, and the OpenAPI
# document's request schemas are their JSON Schema (api/openapi.py). Types are strict ("5" is
# not an integer, true is not a number, 5.0 is not an integer: an integer is written without a
# point or exponent; an integer is a number). Unknown fields are refused at every level. None
# (null) means "not given": the value's default. Two rules are checked by code, beyond what the
# schema states (its descriptions say them): the url's syntax and bootstrap_port only with
# worker_type prefill. Text limits are in UTF-8 bytes; the schema's maxLength (characters)
# states the same number, so it never allows more.

API_KEY_RULE = (
    "printable ASCII without spaces or control characters "
    "(it is sent as an Authorization: Bearer header)"
)


def _url_text(value: object) -> object:
    """A WorkerUrl (built by hand, maybe) is checked by parsing its text again."""
    if isinstance(value, WorkerUrl):
        if not isinstance(value.scheme, str | None) or not isinstance(value.host, str):
            raise InvalidInput("url", "must have a string host (build it with parse_worker_url)")
        return value.text
    return value


Seconds = Annotated[float, Field(le=check.MAX_SECONDS)]
TimeoutSecs = Annotated[Seconds, Field(ge=check.MIN_TIMEOUT_SECS)]
IdleSecs = Annotated[Seconds, Field(ge=0)]
Threshold = Annotated[int, Field(ge=1, le=check.MAX_THRESHOLD)]
Text = Annotated[
    str,
    Field(min_length=1, max_length=check.MAX_TEXT_BYTES),
    check.at_most_bytes(check.MAX_TEXT_BYTES),
]
LabelKey = Annotated[
    str,
    Field(min_length=1, max_length=check.MAX_LABEL_KEY_BYTES),
    check.at_most_bytes(check.MAX_LABEL_KEY_BYTES),
]
LabelValue = Annotated[
    str,
    Field(max_length=check.MAX_LABEL_VALUE_BYTES),
    check.at_most_bytes(check.MAX_LABEL_VALUE_BYTES),
]
Url = Annotated[
    str,
    Field(
        max_length=MAX_URL_BYTES,
        description=(
            "http://H:P, https://H:P, grpc://H:P, grpcs://H:P or bare H:P; checked by code beyond "
            "this schema: no path, query, fragment or userinfo; a port 1-65535; IPv4 as four "
            "decimal numbers; some addresses are refused (README: Worker addresses)"
        ),
    ),
    BeforeValidator(_url_text),
    AfterValidator(parse_worker_url),
]
ApiKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=check.MAX_TEXT_BYTES,
        pattern=r"^[!-~]+$",
        description=API_KEY_RULE,
        json_schema_extra={"writeOnly": True},
    ),
]
Priority = Annotated[int, Field(ge=0, le=100)]
Cost = Annotated[float, Field(gt=0, le=check.MAX_SECONDS)]
Port = Annotated[int, Field(ge=1, le=65535)]
Attempts = Annotated[int, Field(ge=1, le=check.MAX_ATTEMPTS)]
RecheckSecs = (
    Annotated[float, Field(ge=0, le=0, title="off")]
    | Annotated[Seconds, Field(ge=check.MIN_RECHECK_INTERVAL_SECS)]
)

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class HealthBody(BaseModel):
    """A worker's health checks; in a PATCH, only the fields given change."""

    model_config = ConfigDict(**_STRICT, title="HealthConfig")

    timeout_secs: TimeoutSecs | None = None
    check_interval_secs: Annotated[Seconds, Field(ge=check.MIN_CHECK_INTERVAL_SECS)] | None = None
    failure_threshold: Threshold | None = None
    success_threshold: Threshold | None = None
    disable: bool | None = None
    drain_settle_secs: IdleSecs | None = None


class WorkerSpecBody(BaseModel):
    """What an operator asks for (POST and PUT bodies). bootstrap_port is accepted only with
    worker_type prefill (checked beyond this schema)."""

    model_config = ConfigDict(**_STRICT, title="WorkerSpec")

    url: Url
    model_id: (
        Annotated[Text, Field(description="skip model detection, serve this model")] | None
    ) = None
    worker_type: Annotated[WorkerType, Field(strict=False)] | None = None
    bootstrap_port: Annotated[Port, Field(description="only with worker_type prefill")] | None = (
        None
    )
    runtime: Annotated[Runtime, Field(strict=False)] | None = None
    priority: Priority | None = None
    cost: Cost | None = None
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=check.MAX_LABELS)] | None = None
    api_key: ApiKey | None = None
    health: HealthBody | None = None
    max_connection_attempts: Attempts | None = None
    registration_timeout_secs: TimeoutSecs | None = None
    recheck_interval_secs: (
        Annotated[RecheckSecs, Field(description="0 turns rechecks off")] | None
    ) = None
    drain_timeout_secs: IdleSecs | None = None

    @model_validator(mode="after")
    def _bootstrap_port_only_with_prefill(self) -> WorkerSpecBody:
        if self.bootstrap_port is not None and self.worker_type is not WorkerType.PREFILL:
            raise InvalidInput("bootstrap_port", "is only accepted with worker_type prefill")
        return self


class WorkerPatchBody(BaseModel):
    """A PATCH: only the fields given change; labels merge (a label set to null is removed),
    health merges. url cannot change."""

    model_config = ConfigDict(**_STRICT, title="WorkerPatch")

    priority: Priority | None = None
    cost: Cost | None = None
    labels: (
        Annotated[dict[LabelKey, LabelValue | None], Field(max_length=check.MAX_LABELS)] | None
    ) = None
    api_key: ApiKey | None = None
    health: HealthBody | None = None


# ---- the values -----------------------------------------------------------------------------


def _given(body: BaseModel) -> dict[str, Any]:
    """The fields of a validated body that are not None ("not given")."""
    return {name: value for name, value in body.__dict__.items() if value is not None}


def _write_back(instance: object, body: BaseModel) -> None:
    """Keep what validation made of each field (an enum member, a float for an int, a parsed
    URL, a private copy of a mapping); a None field takes the dataclass's default."""
    for name, value in body.__dict__.items():
        if value is None:
            if getattr(instance, name) is None:
                continue
            kind: Any = instance.__class__
            value = _defaults(kind)[name]()
        if value is not getattr(instance, name):
            object.__setattr__(instance, name, value)


@cache
def _defaults(kind: Any) -> dict[str, Callable[[], Any]]:
    """Each field's default, as a factory."""
    made: dict[str, Callable[[], Any]] = {}
    for item in fields(kind):
        factory: Any = item.default_factory
        if item.default is not MISSING:
            factory = partial(_same, item.default)
        made[item.name] = factory
    return made


def _same(value: Any) -> Any:
    return value


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
        values = {name: getattr(self, name) for name in HEALTH_FIELDS}
        _write_back(self, check.validate(HealthBody, values, "health"))


HEALTH_FIELDS = tuple(HealthBody.model_fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """What an operator asks for. ``None`` timing fields take the gateway's defaults.

    ``url`` may be given as a string (``WorkerSpec(url="127.0.0.1:8000")``): it is parsed and the
    WorkerUrl kept. Enum fields take their string values; ``health`` may be a mapping. Validated
    with ``WorkerSpecBody``, as a POST body is.
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
        values = {name: getattr(self, name) for name in SPEC_FIELDS}
        health = values["health"]
        if isinstance(health, HealthConfig):  # it validated itself
            del values["health"]
        labels = values["labels"]
        if isinstance(labels, Mapping) and not isinstance(labels, dict):
            values["labels"] = dict(labels)
        body = check.validate(WorkerSpecBody, values)
        if isinstance(body.health, HealthBody):  # type: ignore[attr-defined]
            object.__setattr__(body, "health", HealthConfig(**_given(body.health)))  # type: ignore[attr-defined]
        elif isinstance(health, HealthConfig):
            object.__setattr__(body, "health", health)
        _write_back(self, body)


SPEC_FIELDS = tuple(WorkerSpecBody.model_fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerPatch:
    """A PATCH: only the fields that are not None change. A label set to None is removed.
    ``health`` maps HealthConfig field names to new values (unknown names are refused).
    Validated with ``WorkerPatchBody``, as a PATCH body is."""

    priority: int | None = None
    cost: float | None = None
    labels: Mapping[str, str | None] | None = None
    api_key: str | None = field(default=None, repr=False)
    health: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        values = {name: getattr(self, name) for name in PATCH_FIELDS}
        for name in ("labels", "health"):
            given = values[name]
            if isinstance(given, Mapping) and not isinstance(given, dict):
                values[name] = dict(given)
        body = check.validate(WorkerPatchBody, values)
        if isinstance(body.health, HealthBody):  # type: ignore[attr-defined]
            object.__setattr__(body, "health", _given(body.health))  # type: ignore[attr-defined]
        _write_back(self, body)

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


PATCH_FIELDS = tuple(WorkerPatchBody.model_fields)


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
