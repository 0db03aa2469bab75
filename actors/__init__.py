"""The model gateway as a library: ``async with open_gateway() as gateway: ...``."""

from actors.config import GatewayConfig
from actors.errors import (
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
from actors.model import (
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
from actors.service import Gateway, open_gateway
from actors.urls import WorkerUrl, parse_worker_url


def worker_spec(url: str, **fields: object) -> WorkerSpec:
    """Build a WorkerSpec from a URL string: ``worker_spec("127.0.0.1:8000", priority=10)``."""
    return WorkerSpec(url=parse_worker_url(url), **fields)  # type: ignore[arg-type]


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
    "PreconditionFailed",
    "RegistryBusy",
    "RegistryError",
    "RegistryTimeout",
    "Runtime",
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
