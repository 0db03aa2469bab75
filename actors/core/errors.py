"""The gateway's error hierarchy (pure).

    GatewayError
    ├── InvalidInput                 400: a value the caller sent is wrong (names the field)
    │   ├── InvalidUrl               400: the worker URL cannot be canonicalised
    │   └── UrlMismatch              400: a PUT names a different address than the worker's
    ├── RegistryError                an expected "no" from the registry
    │   ├── WorkerNotFound           404
    │   ├── WorkerAlreadyExists      409: the address is taken (carries the existing id)
    │   ├── WorkerDraining           409: the worker is being removed
    │   ├── WorkerNotFailed          409: retry of a worker that is not failed
    │   ├── PreconditionFailed       412: If-Match does not match the spec version
    │   ├── StaleJob                 a workflow's result arrived after it was superseded
    │   ├── RegistryBusy             503: the registration queue is full; nothing was changed
    │   └── WorkerFailed             (library) wait_status saw the worker fail
    ├── GatewayStopped               503: the gateway is shutting down
    ├── RegistryTimeout              503: the registry did not answer an ask in time
    └── DetectionError               a probe of a worker failed (the reason is the message)

Every error carries ``code`` (UPPER_SNAKE, smg's codes where smg has one), ``status`` (the HTTP
status the API answers) and ``context`` (extra JSON fields for the error body).
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context


class InvalidInput(GatewayError, ValueError):
    """Also a ValueError: a library caller's ``except ValueError`` catches a bad value."""

    code = "BAD_REQUEST"
    status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message, field=field)
        self.field = field


class InvalidUrl(InvalidInput):
    def __init__(self, url: str, reason: str, *, field: str = "url") -> None:
        super().__init__(field, f"{url!r} {reason}")


class UrlMismatch(InvalidInput):
    code = "URL_MISMATCH"

    def __init__(self, current: str, requested: str) -> None:
        super().__init__(
            "url",
            f"the worker's address is {current} but the body names {requested}; "
            "an address cannot change with PUT: DELETE the worker and POST the new one",
        )


class RegistryError(GatewayError):
    pass


class WorkerNotFound(RegistryError):
    code = "WORKER_NOT_FOUND"
    status = 404

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"Worker {worker_id} not found", worker_id=worker_id)


class WorkerAlreadyExists(RegistryError):
    code = "WORKER_ALREADY_EXISTS"
    status = 409

    def __init__(self, key: str, worker_id: str) -> None:
        super().__init__(
            f"Worker already exists at {key} with ID {worker_id}. Use PUT /workers/{worker_id} "
            f"to replace or PATCH /workers/{worker_id} to update it.",
            worker_id=worker_id,
        )
        self.worker_id = worker_id


class WorkerDraining(RegistryError):
    code = "WORKER_DRAINING"
    status = 409

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"Worker {worker_id} is draining and will be removed", worker_id=worker_id)


class WorkerNotFailed(RegistryError):
    code = "WORKER_NOT_FAILED"
    status = 409

    def __init__(self, worker_id: str, status: str) -> None:
        super().__init__(
            f"Worker {worker_id} is {status}; only a failed worker can be retried",
            worker_id=worker_id,
            worker_status=status,
        )


class PreconditionFailed(RegistryError):
    code = "PRECONDITION_FAILED"
    status = 412

    def __init__(self, worker_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"Worker {worker_id} is at spec version {actual}, not {expected} (If-Match)",
            worker_id=worker_id,
            spec_version=actual,
        )


class StaleJob(RegistryError):
    code = "STALE_JOB"
    status = 409

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"Job result for {worker_id} ignored: {reason}", worker_id=worker_id)
        self.reason = reason


class RegistryBusy(RegistryError):
    code = "REGISTRY_BUSY"
    status = 503

    def __init__(self, queue_size: int) -> None:
        super().__init__(
            f"The registration queue is full ({queue_size} jobs); nothing was registered, "
            "try again shortly",
            queue_size=queue_size,
        )


class GatewayStopped(GatewayError):
    code = "GATEWAY_STOPPED"
    status = 503

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down")


class RegistryTimeout(GatewayError):
    code = "REGISTRY_TIMEOUT"
    status = 503


class DetectionError(GatewayError):
    code = "DETECTION_FAILED"
    status = 502


class WorkerFailed(RegistryError):
    """Raised by ``Gateway.wait_status`` when the worker failed while another status was awaited."""

    code = "WORKER_FAILED"
    status = 409

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"Worker {worker_id} failed: {reason}", worker_id=worker_id)
        self.reason = reason
