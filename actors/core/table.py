"""WorkerTable: every registry rule, as synchronous methods (pure).

Each method checks everything first and changes state only when nothing can fail any more, so a
refused command leaves nothing half-done. Every change goes through ``_put``/``_delete``
(``WorkerIndexes``: overwrite the record, then diff the indexes), so no index ever lags its
record and a replaced worker is never missing from an index. Work that needs I/O (detection,
cancelling a workflow) is returned as effects for the registry actor to carry out.

**Changes.** The table also records which workers each batch of commands touched
(``take_changes()``: the ids to write and the ids to delete, for the store) together with what
they were before, so a batch the store refused can be taken back (``undo(changes)``): the table
never holds what the store did not keep.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

from actors.core import commands as cmd
from actors.core import errors
from actors.core.indexes import WorkerIndexes
from actors.core.jobs import JobBook, Replacement, UuidSource, require_job
from actors.core.model import (
    Detection,
    JobState,
    JobStatus,
    JobType,
    Worker,
    WorkerId,
    WorkerPatch,
    WorkerSpec,
    WorkerStatus,
)
from actors.core.snapshot import RegistrySnapshot


@dataclass(slots=True)
class Changes:
    """What the table changed since the previous ``take_changes()``.

    ``upserted``: workers to write (their current record); ``deleted``: workers that are gone
    (an id is in at most one of the two). ``before`` and ``replacing`` are for ``undo``: each
    touched worker as it was (None: it did not exist) and the replacements in progress."""

    upserted: set[WorkerId] = field(default_factory=set)
    deleted: set[WorkerId] = field(default_factory=set)
    before: dict[WorkerId, Worker | None] = field(default_factory=dict)
    replacing: dict[WorkerId, Replacement] | None = None

    @property
    def empty(self) -> bool:
        return not self.upserted and not self.deleted


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
        self._changes = Changes()

    # ---- the one entry point the registry actor uses -------------------------------------

    def apply(self, command: cmd.Command, *, now: float, job_slots: int | None = None) -> Worker:
        """Run one command. ``job_slots`` is how many more jobs the queue can take now."""
        self._jobs.slots = self._jobs.queue_size if job_slots is None else job_slots
        self._remember_replacing()
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
            case cmd.TakeOverJob(worker_id=wid, job_id=job_id):
                return self.take_over(wid, job_id, now=now)

    @property
    def next_job_id(self) -> int:
        return self._jobs.next_id

    def adopt(self, worker: Worker, *, now: float, replacement: WorkerSpec | None = None) -> None:
        """Take in a stored worker after a restart (actors/core/codec.py). Work that was in
        progress restarts from its first attempt under a new job: a registration or retry of a
        pending worker, a recheck of a failed one, and a PUT (``replacement``: the spec it was
        detecting) of a ready one (without it, the PUT is recorded as cancelled and the old spec
        keeps serving). A draining worker is dropped (nothing is in flight after a restart) and
        recorded as deleted. Only a worker whose record changes is recorded as upserted."""
        self._remember_replacing()
        job = worker.job
        active = job is not None and job.active
        if worker.status is WorkerStatus.DRAINING:
            self._changes.before.setdefault(worker.id, None)
            self._changes.deleted.add(worker.id)
            return
        if worker.status is WorkerStatus.PENDING:
            job_type = job.job_type if job is not None and active else JobType.ADD
            if job_type not in (JobType.ADD, JobType.RETRY):
                job_type = JobType.ADD
            job = self._jobs.start(worker.id, job_type, worker.spec, now)
        elif job is not None and active:
            if worker.status is WorkerStatus.FAILED and job.job_type is JobType.RECHECK:
                message = job.message
                job = self._jobs.start(worker.id, JobType.RECHECK, worker.spec, now)
                job = replace(job, message=message)
            elif job.job_type is JobType.REPLACE and replacement is not None:
                job = self._jobs.start(worker.id, JobType.REPLACE, replacement, now)
                self._jobs.replacing[worker.id] = Replacement(job.job_id, replacement)
            else:
                job = replace(job, state=JobState.CANCELLED, message="the gateway restarted")
        if job is worker.job:
            self._indexes.put(worker)  # unchanged: nothing to write back
        else:
            self._put(replace(worker, job=job))

    def take_effects(self) -> list[cmd.Effect]:
        return self._jobs.take_effects()

    def take_changes(self) -> Changes:
        """What changed since the last call (see ``Changes``); starts a new record."""
        changes, self._changes = self._changes, Changes()
        return changes

    def undo(self, changes: Changes) -> None:
        """Take back ``changes`` (the last ``take_changes()``, nothing applied since): every
        touched worker is as it was, the replacements in progress too, and the effects not yet
        taken are dropped. Counters are not wound back (ids and job ids are only skipped)."""
        for worker_id, old in changes.before.items():
            current = self._workers.get(worker_id)
            if old is not None:
                self._indexes.put(old)
            elif current is not None:
                self._indexes.delete(current)
        if changes.replacing is not None:
            self._jobs.replacing.clear()
            self._jobs.replacing.update(changes.replacing)
        self._jobs.take_effects()
        self._changes = Changes()

    def absorb(
        self,
        upserts: Mapping[WorkerId, tuple[Worker, WorkerSpec | None]],
        deletes: Collection[WorkerId],
        *,
        next_job_id: int,
        everything: bool = False,
    ) -> list[cmd.Effect]:
        """Take in a change another replica committed (it is stored already, so it is not
        recorded in ``take_changes()``; call this with no changes pending). ``upserts``: each
        worker's record and the spec a PUT of it is detecting (or None); ``everything``: the
        upserts are the whole registry and every other worker is gone. Returns the effects
        for this replica: cancel any job of its own that the change superseded (a worker
        removed, or given another job)."""
        effects: list[cmd.Effect] = []
        gone = set(self._workers) - set(upserts) if everything else set(deletes)
        for worker_id in gone:
            worker = self._workers.get(worker_id)
            if worker is not None:
                self._indexes.delete(worker)
                self._jobs.replacing.pop(worker_id, None)
                effects.append(cmd.CancelJob(worker_id=worker_id, job_id=None))
        for worker_id, (worker, replacing) in upserts.items():
            old = self._workers.get(worker_id)
            old_job = None if old is None else old.job
            new = worker.job
            if (
                old_job is not None
                and old_job.active
                and (new is None or new.job_id != old_job.job_id or not new.active)
            ):  # superseded, or ended by another replica (a PATCH cancelling a PUT)
                effects.append(cmd.CancelJob(worker_id=worker_id, job_id=old_job.job_id))
            self._indexes.put(worker)
            job = worker.job
            if (
                replacing is not None
                and job is not None
                and job.active
                and job.job_type is JobType.REPLACE
            ):
                self._jobs.replacing[worker_id] = Replacement(job.job_id, replacing)
            else:
                self._jobs.replacing.pop(worker_id, None)
        self._jobs.next_id = max(self._jobs.next_id, next_job_id)
        return effects

    def replacement(self, worker_id: WorkerId) -> WorkerSpec | None:
        """The spec a PUT of this worker is detecting, if one is in progress."""
        swap = self._jobs.replacing.get(worker_id)
        return None if swap is None else swap.spec

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
        return self._registered(worker, detection, done, now=now)

    def mark_failed(self, worker_id: WorkerId, job_id: int, reason: str, *, now: float) -> Worker:
        worker = self._require(worker_id)
        job = require_job(worker, job_id)
        failed = replace(job, state=JobState.FAILED, message=reason, updated_at=now)
        if job.job_type is JobType.REPLACE:  # the old spec keeps serving
            del self._jobs.replacing[worker_id]
            return self._put(replace(worker, job=failed, updated_at=now))
        return self._registered(worker, None, failed, now=now)

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

    def take_over(self, worker_id: WorkerId, job_id: int, *, now: float) -> Worker:
        """Run a job again from its first attempt under a new job id (its replica stopped:
        a late result of the first run is stale); for a failed worker whose recheck that
        replica had scheduled, the recheck now. Refused (StaleJob) if it is over."""
        worker = self._require(worker_id)
        ended = worker.job
        if worker.status is WorkerStatus.FAILED and ended is not None and not ended.active:
            return self.recheck(worker_id, job_id, now=now)
        job = require_job(worker, job_id)
        self._jobs.require_slot()
        spec = worker.spec
        if job.job_type is JobType.REPLACE:
            swap = self._jobs.replacing.get(worker_id)
            if swap is None:
                raise errors.StaleJob(worker_id, "the replacement's spec is not known")
            spec = swap.spec
        new = self._jobs.start(worker_id, job.job_type, spec, now)
        if job.job_type is JobType.REPLACE:
            self._jobs.replacing[worker_id] = Replacement(new.job_id, spec)
        new = replace(new, message="taken over from a replica that stopped")
        return self._put(replace(worker, job=new, updated_at=now))

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

    def _registered(
        self, worker: Worker, detection: Detection | None, job: JobStatus, *, now: float
    ) -> Worker:
        """A registration ended: ready (and healthy) with its detection, or failed without."""
        status = WorkerStatus.FAILED if detection is None else WorkerStatus.READY
        return self._put(
            replace(
                worker,
                status=status,
                detection=detection,
                is_healthy=detection is not None,
                job=job,
                updated_at=now,
            )
        )

    def _remember_replacing(self) -> None:
        if self._changes.replacing is None:
            self._changes.replacing = dict(self._jobs.replacing)

    def _put(self, worker: Worker) -> Worker:
        changes = self._changes
        if worker.id not in changes.before:
            changes.before[worker.id] = self._workers.get(worker.id)
        changes.deleted.discard(worker.id)
        changes.upserted.add(worker.id)
        return self._indexes.put(worker)

    def _delete(self, worker: Worker) -> None:
        changes = self._changes
        if worker.id not in changes.before:
            changes.before[worker.id] = worker
        changes.upserted.discard(worker.id)
        changes.deleted.add(worker.id)
        self._indexes.delete(worker)
        self._jobs.forget(worker)
