"""WorkerTable: every registry rule, as synchronous methods (pure).

Each method checks everything first and changes state only when nothing can fail any more, so a
refused command leaves nothing half-done. Every change goes through ``_put``/``_delete``
(``WorkerIndexes``: overwrite the record, then diff the indexes), so no index ever lags its
record and a replaced worker is never missing from an index. Work that needs I/O (detection,
cancelling a workflow) is returned as effects for the registry actor to carry out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from actors.core import commands as cmd
from actors.core import errors
from actors.core.indexes import WorkerIndexes
from actors.core.jobs import JobBook, Replacement, UuidSource, require_job
from actors.core.model import (
    Detection,
    JobState,
    JobType,
    Worker,
    WorkerId,
    WorkerPatch,
    WorkerSpec,
    WorkerStatus,
)
from actors.core.snapshot import RegistrySnapshot


class WorkerTable:
    def __init__(
        self,
        *,
        new_id: Callable[[], str] | None = None,
        queue_size: int = 1024,
        first_job_id: int = 1,
    ) -> None:
        self._new_id = new_id or UuidSource()
        self._indexes = WorkerIndexes()
        self._workers = self._indexes.workers  # read here; changed only via _put/_delete
        self._jobs = JobBook(queue_size, first_job_id)

    # ---- the one entry point the registry actor uses -------------------------------------

    def apply(self, command: cmd.Command, *, now: float, job_slots: int | None = None) -> Worker:
        """Run one command. ``job_slots`` is how many more jobs the queue can take now."""
        self._jobs.slots = self._jobs.queue_size if job_slots is None else job_slots
        match command:
            case cmd.CreateWorker(spec=spec):
                return self.create(spec, now=now)
            case cmd.StartAttempt(worker_id=wid, job_id=job_id, attempt=attempt, message=message):
                return self.start_attempt(wid, job_id, attempt, message, now=now)
            case cmd.MarkReady(worker_id=wid, job_id=job_id, detection=detection):
                return self.mark_ready(wid, job_id, detection, now=now)
            case cmd.MarkFailed(worker_id=wid, job_id=job_id, reason=reason):
                return self.mark_failed(wid, job_id, reason, now=now)
            case cmd.ReplaceSpec(worker_id=wid, spec=spec, if_match=if_match):
                return self.replace(wid, spec, if_match=if_match, now=now)
            case cmd.UpdateSpec(worker_id=wid, patch=patch, if_match=if_match):
                return self.update(wid, patch, if_match=if_match, now=now)
            case cmd.BeginDrain(worker_id=wid):
                return self.begin_drain(wid, now=now)
            case cmd.FinishDrain(worker_id=wid):
                return self.finish_drain(wid)
            case cmd.RetryWorker(worker_id=wid):
                return self.retry(wid, now=now)
            case cmd.RecheckWorker(worker_id=wid, job_id=job_id):
                return self.recheck(wid, job_id, now=now)
            case cmd.SetHealth(worker_id=wid, healthy=healthy):
                return self.set_health(wid, healthy, now=now)

    @property
    def next_job_id(self) -> int:
        return self._jobs.next_id

    def adopt(self, worker: Worker, *, now: float) -> None:
        """Take in a worker from a dump; work in progress restarts (actors/core/persistence.py)."""
        job = worker.job
        if worker.status is WorkerStatus.DRAINING:
            return
        if worker.status is WorkerStatus.PENDING:
            job = self._jobs.start(worker.id, JobType.ADD, worker.spec, now)
        elif job is not None and job.active:
            job = replace(job, state=JobState.CANCELLED, message="the gateway restarted")
        self._put(replace(worker, job=job))

    def take_effects(self) -> list[cmd.Effect]:
        return self._jobs.take_effects()

    # ---- rules -------------------------------------------------------------------------

    def create(self, spec: WorkerSpec, *, now: float) -> Worker:
        key = spec.url.key
        if (existing := self._indexes.by_key.get(key)) is not None:
            raise errors.WorkerAlreadyExists(key, existing)
        self._jobs.require_slot()
        worker_id = self._new_id()
        while worker_id in self._workers:  # never hand out a live id twice
            worker_id = self._new_id()
        job = self._jobs.start(worker_id, JobType.ADD, spec, now)
        return self._put(Worker.pending(id=worker_id, spec=spec, job=job, now=now))

    def start_attempt(
        self, worker_id: WorkerId, job_id: int, attempt: int, message: str | None, *, now: float
    ) -> Worker:
        worker = self._require(worker_id)
        job = require_job(worker, job_id)
        job = replace(
            job, state=JobState.RUNNING, attempts=attempt, message=message, updated_at=now
        )
        return self._put(replace(worker, job=job))

    def mark_ready(
        self, worker_id: WorkerId, job_id: int, detection: Detection, *, now: float
    ) -> Worker:
        worker = self._require(worker_id)
        job = require_job(worker, job_id)
        if detection.url.key != worker.key:
            raise errors.StaleJob(
                worker_id, f"detection is for {detection.url.key}, not {worker.key}"
            )
        done = replace(job, state=JobState.SUCCEEDED, message=None, updated_at=now)
        if job.job_type is JobType.REPLACE:
            swap = self._jobs.replacing.pop(worker_id)
            return self._put(
                replace(
                    worker,
                    spec=swap.spec,
                    detection=detection,
                    spec_version=worker.spec_version + 1,
                    job=done,
                    updated_at=now,
                )
            )
        return self._put(
            replace(
                worker,
                status=WorkerStatus.READY,
                detection=detection,
                is_healthy=True,
                job=done,
                updated_at=now,
            )
        )

    def mark_failed(self, worker_id: WorkerId, job_id: int, reason: str, *, now: float) -> Worker:
        worker = self._require(worker_id)
        job = require_job(worker, job_id)
        failed = replace(job, state=JobState.FAILED, message=reason, updated_at=now)
        if job.job_type is JobType.REPLACE:  # the old spec keeps serving
            del self._jobs.replacing[worker_id]
            return self._put(replace(worker, job=failed, updated_at=now))
        return self._put(
            replace(
                worker,
                status=WorkerStatus.FAILED,
                detection=None,
                is_healthy=False,
                job=failed,
                updated_at=now,
            )
        )

    def replace(
        self, worker_id: WorkerId, spec: WorkerSpec, *, if_match: int | None, now: float
    ) -> Worker:
        worker = self._require(worker_id)
        if spec.url.key != worker.key:
            raise errors.UrlMismatch(worker.url.text, spec.url.text)
        if worker.status is WorkerStatus.DRAINING:
            raise errors.WorkerDraining(worker_id)
        worker.require_version(if_match)
        self._jobs.require_slot()
        self._jobs.cancel_active(worker)
        if worker.status is WorkerStatus.READY:
            job = self._jobs.start(worker_id, JobType.REPLACE, spec, now)
            self._jobs.replacing[worker_id] = Replacement(job.job_id, spec)
            updated = replace(worker, job=job, updated_at=now)
        else:  # nothing is serving yet: the new spec applies at once and registration restarts
            job = self._jobs.start(worker_id, JobType.ADD, spec, now)
            updated = replace(
                worker,
                spec=spec,
                spec_version=worker.spec_version + 1,
                status=WorkerStatus.PENDING,
                detection=None,
                is_healthy=False,
                job=job,
                updated_at=now,
            )
        return self._put(updated)

    def update(
        self, worker_id: WorkerId, patch: WorkerPatch, *, if_match: int | None, now: float
    ) -> Worker:
        worker = self._require(worker_id)
        worker.require_version(if_match)
        spec = patch.apply(worker.spec)
        job = worker.job
        if job is not None and job.active and job.job_type is JobType.REPLACE:
            self._jobs.cancel_active(worker)
            job = replace(
                job,
                state=JobState.CANCELLED,
                message=f"superseded by a PATCH (spec version {worker.spec_version + 1})",
                updated_at=now,
            )
        return self._put(
            replace(
                worker, spec=spec, spec_version=worker.spec_version + 1, job=job, updated_at=now
            )
        )

    def begin_drain(self, worker_id: WorkerId, *, now: float) -> Worker:
        worker = self._require(worker_id)
        if worker.status is WorkerStatus.DRAINING:
            return worker
        self._jobs.cancel_active(worker)
        if worker.status is not WorkerStatus.READY:  # pending or failed: nothing to drain
            self._delete(worker)
            return worker
        job = self._jobs.new(JobType.REMOVE, now)
        job = replace(job, state=JobState.RUNNING, message="draining in-flight requests")
        return self._put(replace(worker, status=WorkerStatus.DRAINING, job=job, updated_at=now))

    def finish_drain(self, worker_id: WorkerId) -> Worker:
        worker = self._require(worker_id)
        if worker.status is not WorkerStatus.DRAINING:
            raise errors.StaleJob(worker_id, f"worker is {worker.status}, not draining")
        self._delete(worker)
        return worker

    def retry(self, worker_id: WorkerId, *, now: float) -> Worker:
        worker = self._require(worker_id)
        if worker.status is not WorkerStatus.FAILED:
            raise errors.WorkerNotFailed(worker_id, worker.status)
        self._jobs.require_slot()
        self._jobs.cancel_active(worker)
        job = self._jobs.start(worker_id, JobType.RETRY, worker.spec, now)
        return self._put(replace(worker, status=WorkerStatus.PENDING, job=job, updated_at=now))

    def recheck(self, worker_id: WorkerId, job_id: int, *, now: float) -> Worker:
        """Re-probe a failed worker in the background, if nothing newer happened to it."""
        worker = self._require(worker_id)
        if worker.status is not WorkerStatus.FAILED or worker.job is None:
            raise errors.StaleJob(worker_id, f"worker is {worker.status}")
        if worker.job.job_id != job_id or worker.job.active:
            raise errors.StaleJob(worker_id, "a newer job took over")
        self._jobs.require_slot()
        job = self._jobs.start(worker_id, JobType.RECHECK, worker.spec, now)
        job = replace(job, message=worker.job.message)
        return self._put(replace(worker, job=job, updated_at=now))

    def set_health(self, worker_id: WorkerId, healthy: bool, *, now: float) -> Worker:
        worker = self._require(worker_id)
        if worker.status not in (WorkerStatus.READY, WorkerStatus.DRAINING):
            raise errors.StaleJob(worker_id, f"worker is {worker.status}")
        if worker.is_healthy == healthy:
            return worker
        return self._put(replace(worker, is_healthy=healthy, updated_at=now))

    # ---- reads -------------------------------------------------------------------------

    def get(self, worker_id: WorkerId) -> Worker | None:
        return self._workers.get(worker_id)

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def workers(self) -> Mapping[WorkerId, Worker]:
        return self._workers

    @property
    def indexes(self) -> WorkerIndexes:
        """The indexes, to read (copies: ``key_index()``, ``model_index()``...)."""
        return self._indexes

    def snapshot(self) -> RegistrySnapshot:
        return self._indexes.snapshot()

    # ---- internals ---------------------------------------------------------------------

    def _require(self, worker_id: WorkerId) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise errors.WorkerNotFound(worker_id)
        return worker

    def _put(self, worker: Worker) -> Worker:
        return self._indexes.put(worker)

    def _delete(self, worker: Worker) -> None:
        self._indexes.delete(worker)
        self._jobs.forget(worker)
