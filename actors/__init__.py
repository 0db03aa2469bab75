"""The model gateway as a library: ``async with open_gateway() as gateway: ...``."""

from actors.core.config import GatewayConfig
from actors.core.errors import (
    DetectionError,
    GatewayError,
    GatewayStopped,
    InvalidInput,
    InvalidUrl,
    PreconditionFailed,
    RegistryBusy,
    RegistryError,
    RegistryTimeout,
    UrlMismatch,
    WorkerAlreadyExists,
    WorkerDraining,
    WorkerFailed,
    WorkerNotFailed,
    WorkerNotFound,
)
from actors.core.model import (
    SPEC_FIELDS,
    HealthConfig,
    JobState,
    JobType,
    Runtime,
    Worker,
    WorkerPatch,
    WorkerSpec,
    WorkerStatus,
    WorkerType,
)
from actors.core.urls import WorkerUrl, parse_worker_url
from actors.registry.registry import StoreUnavailable
from actors.registry.service import Gateway
from actors.registry.startup import open_gateway
from actors.store import MemoryStore, SqliteStore, Store, StoreError, StoreInUse


def worker_spec(url: str | WorkerUrl, **fields: object) -> WorkerSpec:
    """Build a WorkerSpec from a URL string: ``worker_spec("127.0.0.1:8000", priority=10)``.
    Checked like a POST /workers body: InvalidInput names the first bad (or unknown) field."""
    for name in fields:
        if name not in SPEC_FIELDS:
            known = ", ".join(sorted(SPEC_FIELDS))
            raise InvalidInput(name, f"unknown field (accepted: {known})")
    return WorkerSpec(url=url, **fields)  # type: ignore[arg-type]


__all__ = [
    "DetectionError",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayStopped",
    "HealthConfig",
    "InvalidInput",
    "InvalidUrl",
    "JobState",
    "JobType",
    "MemoryStore",
    "PreconditionFailed",
    "RegistryBusy",
    "RegistryError",
    "RegistryTimeout",
    "Runtime",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreInUse",
    "StoreUnavailable",
    "UrlMismatch",
    "Worker",
    "WorkerAlreadyExists",
    "WorkerDraining",
    "WorkerFailed",
    "WorkerNotFailed",
    "WorkerNotFound",
    "WorkerPatch",
    "WorkerSpec",
    "WorkerStatus",
    "WorkerType",
    "WorkerUrl",
    "open_gateway",
    "parse_worker_url",
    "worker_spec",
]
