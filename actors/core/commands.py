"""What the registry can be asked (pure): one frozen dataclass per command, and the effects the
table hands back to the registry actor (jobs to start or cancel).

Each command subclasses ``Ask[T]`` where ``T`` is the type of its answer, so ``ask()`` is typed.
``job_id`` fields are the token of the workflow that sends the command: a result from a job that
was superseded (a later PUT, PATCH, DELETE or retry) is refused with ``StaleJob``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from actors.core.model import Detection, JobType, Worker, WorkerId, WorkerPatch, WorkerSpec

T = TypeVar("T", covariant=True)


class Ask(Generic[T]):
    """Base of every command; ``T`` is what the registry answers."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateWorker(Ask[Worker]):
    spec: WorkerSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class StartAttempt(Ask[Worker]):
    worker_id: WorkerId
    job_id: int
    attempt: int
    message: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkReady(Ask[Worker]):
    """A job's detection succeeded: a registration makes the worker ready, a replace swaps in
    the job's spec in place."""

    worker_id: WorkerId
    job_id: int
    detection: Detection


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkFailed(Ask[Worker]):
    """A job gave up: a registration makes the worker failed, a replace leaves the old spec."""

    worker_id: WorkerId
    job_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaceSpec(Ask[Worker]):
    worker_id: WorkerId
    spec: WorkerSpec
    if_match: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateSpec(Ask[Worker]):
    worker_id: WorkerId
    patch: WorkerPatch
    if_match: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BeginDrain(Ask[Worker]):
    worker_id: WorkerId


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishDrain(Ask[Worker]):
    worker_id: WorkerId


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryWorker(Ask[Worker]):
    worker_id: WorkerId


@dataclass(frozen=True, slots=True, kw_only=True)
class RecheckWorker(Ask[Worker]):
    worker_id: WorkerId
    job_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetHealth(Ask[Worker]):
    worker_id: WorkerId
    healthy: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TakeOverJob(Ask[Worker]):
    """Run again, under a new job id, a job whose replica stopped (a shared store)."""

    worker_id: WorkerId
    job_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Sync(Ask[None]):
    """Changes nothing: answered once the registry has taken in every change other replicas
    committed before it was handled (with a shared store; at once otherwise)."""


Command: TypeAlias = (
    CreateWorker
    | StartAttempt
    | MarkReady
    | MarkFailed
    | ReplaceSpec
    | UpdateSpec
    | BeginDrain
    | FinishDrain
    | RetryWorker
    | RecheckWorker
    | SetHealth
    | TakeOverJob
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartJob:
    """Effect: queue a workflow for this worker. ``spec`` is what it must detect."""

    worker_id: WorkerId
    job_id: int
    job_type: JobType
    spec: WorkerSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelJob:
    """Effect: stop the workflow working on this worker now (it was superseded or removed).
    ``job_id`` None: whatever job it has (the worker is gone)."""

    worker_id: WorkerId
    job_id: int | None


Effect: TypeAlias = StartJob | CancelJob
