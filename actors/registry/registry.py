"""run_registry(): the actor that owns the WorkerTable.

It takes one envelope at a time from its bounded inbox; when several asks are queued it takes
them all (up to ``MAX_BATCH``) and handles them as one batch:

    apply each (sync, so atomic) → take the table's changes → store.commit(one Batch)
    → publish one snapshot → carry out the effects → answer every ask

* **Durable before visible.** The batch's changes (only the workers it touched, a row each, and
  the counters when their reservation moves: ``Journal``) are written as one transaction before
  anything is published or answered, so an answer a client received is never lost, and nothing
  is published that is not stored. While the batch is being written the actor takes no new
  asks, so replies go out in commit order. Between the commit's return and the replies there is
  no checkpoint. A batch that changed nothing is not written (no await at all).
* **Effects after the commit.** Jobs are queued (``StartJob``) and cancelled, drains started
  and removed workers forgotten by the data plane only once the batch is stored: no workflow
  starts on a worker the store does not hold. Started jobs wait in a backlog when the jobs
  channel is full (a recovery may restart more registrations than it holds); the backlog moves
  on at every batch and counts against the free slots of new registrations.
* **A refused commit is one batch's error.** If the store refuses (``StoreError``: disk full,
  I/O error, a locked file), the table takes the batch back (``WorkerTable.undo``: every touched
  worker as it was), nothing is published, no effect is carried out, and every ask of the batch
  is answered ``StoreUnavailable`` (503); the gateway keeps serving the state it has. Any other
  error from the store is a bug and crashes loudly (every queued ask is answered on the way).
* An idle worker whose DELETE begins its drain is removed in the same batch (``Drainer``,
  ``actors/registry/drain.py``); a busy one is handed to the Drainer after the commit.

It never awaits anyone but its inbox and its store, so asks cannot deadlock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import outcome
import trio

from actors.core.codec import spec_from_plain, stored_worker, worker_from_plain
from actors.core.commands import (
    BeginDrain,
    CancelJob,
    CreateWorker,
    Effect,
    RecheckWorker,
    ReplaceSpec,
    RetryWorker,
    StartJob,
    Sync,
    TakeOverJob,
)
from actors.core.errors import GatewayError
from actors.core.jobs import UuidSource
from actors.core.model import JobType, Worker, WorkerId, WorkerSpec, WorkerStatus
from actors.core.snapshot import RegistrySnapshot
from actors.core.table import Changes, WorkerTable
from actors.registry.drain import Drainer
from actors.registry.mailbox import Envelope, Inbox, refuse_pending
from actors.store.base import (
    Batch,
    Behind,
    Change,
    Reservation,
    StoredState,
    StoreError,
    is_shared,
)
from actors.store.writer import StoreWriter

log = logging.getLogger("tmg.registry")
_STARTS_JOBS = (CreateWorker, ReplaceSpec, RetryWorker, RecheckWorker, TakeOverJob)
MAX_BATCH = 64  # commands applied between two publishes when asks queue up
RESERVATION_BLOCK = 1000  # ids and job ids reserved ahead in the store (actors/store/base.py)
MAX_CATCH_UPS = 16  # a batch decided again this often (other replicas kept committing): 503


class StoreUnavailable(GatewayError):
    """503: the store refused to write this batch of changes; nothing of it was applied."""

    code = "STORE_UNAVAILABLE"
    status = 503

    def __init__(self) -> None:
        super().__init__(
            "The registry could not store this change, so it was not made; try again shortly"
        )


@dataclass(slots=True)
class Job:
    """A queued workflow: the table's StartJob plus the cancel scope its task will run in."""

    start: StartJob
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


JobsSend = trio.MemorySendChannel[Job]
JobsReceive = trio.MemoryReceiveChannel[Job]


class Journal:
    """The registry's side of its store: one ``Batch`` per batch of commands, with only the
    workers the table says changed (``codec.stored_worker``: a row each) and the counters whose
    reserved marks move (``Reservation``: in blocks of ``RESERVATION_BLOCK``), and the id
    prefix in the first batch when it is new.

    **Shared store** (``actors.store.base.SharedStore``: several replicas): every batch, even
    one that changed nothing, is committed after ``applied``, the last change this replica has
    taken in, so every answer is decided on the newest state: if another replica committed
    since, the store raises ``Behind`` and the registry takes the missing changes in
    (``absorb``) and decides the batch again. The batch then carries the exact counters (every
    replica keeps the highest it saw: ids and job ids are never handed out twice) and each
    updated worker's ``spec_version`` before it (the store's compare-and-set)."""

    def __init__(
        self,
        writer: StoreWriter,
        table: WorkerTable,
        ids: UuidSource,
        stored: StoredState,
        *,
        block: int = RESERVATION_BLOCK,
    ) -> None:
        self.writer = writer
        self.shared = is_shared(writer.store)
        self.replica: str = getattr(writer.store, "replica", "")
        self.applied = stored.change_seq  # a shared store's last change taken in
        self._table = table
        self._ids = ids
        self._id_mark = Reservation(stored.id_high_water, block)
        self._job_mark = Reservation(stored.next_job_id, block)
        self._prefix_stored = stored.id_prefix == ids.prefix

    @property
    def decides(self) -> bool:
        """Whether the store can commit a batch decided inside its writers' lock."""
        return self.shared and callable(getattr(self.writer.store, "commit_decided", None))

    def shared_batch(self, changes: Changes, started_jobs: Mapping[WorkerId, int]) -> Batch:
        """A shared store's batch for ``changes``, with the jobs it started (see ``batch``)."""
        batch = self.batch(changes)
        started = {w: j for w, j in started_jobs.items() if w in batch.upserts}
        return dataclasses.replace(batch, started_jobs=started) if started else batch

    async def commit_decided(self, decide: Callable[[list[Change]], Batch]) -> None:
        """``SharedStore.commit_decided``: ``decide`` runs on the trio thread (while the
        registry waits here), called from the writer's thread inside the store's lock."""
        token = trio.lowlevel.current_trio_token()
        built: list[Batch] = []

        def in_trio(changes: list[Change]) -> Batch:
            built.append(decide(changes))
            return built[-1]

        def from_writer(changes: list[Change]) -> Batch:
            return trio.from_thread.run_sync(in_trio, changes, trio_token=token)

        store: Any = self.writer.store
        self.applied = await self.writer.call(
            partial(store.commit_decided, self.applied, from_writer)
        )
        if built and built[-1].id_prefix is not None:
            self._prefix_stored = True

    def batch(self, changes: Changes) -> Batch:
        table = self._table
        upserts = {worker_id: stored_worker(table, worker_id) for worker_id in changes.upserted}
        prefix = None if self._prefix_stored else self._ids.prefix
        if self.shared:
            if not upserts and not changes.deleted:
                return Batch()
            return Batch(
                upserts=upserts,
                deletes=changes.deleted,
                id_prefix=prefix,
                id_high_water=self._ids.count,
                next_job_id=table.next_job_id,
                versions_before={
                    worker_id: None
                    if (old := changes.before.get(worker_id)) is None
                    else old.spec_version
                    for worker_id in upserts
                },
            )
        return Batch(
            upserts=upserts,
            deletes=changes.deleted,
            id_prefix=prefix,
            id_high_water=self._id_mark.advance(self._ids.count),
            next_job_id=self._job_mark.advance(table.next_job_id),
        )

    async def commit(
        self,
        changes: Changes,
        *,
        fresh: bool = False,
        started_jobs: Mapping[WorkerId, int] | None = None,
    ) -> None:
        """Write ``changes`` as one transaction (nothing, without a checkpoint, when there is
        nothing to write, unless the store is shared and ``fresh`` is False: see above). On
        any error the reservations are as before (the marks the batch would have stored are
        not held by the store) and the error propagates (``Behind`` included)."""
        marks = self._id_mark.mark, self._job_mark.mark
        try:
            batch = self.batch(changes)
            if self.shared:
                if batch.empty and fresh:
                    return
                started = {w: j for w, j in (started_jobs or {}).items() if w in batch.upserts}
                if started:
                    batch = dataclasses.replace(batch, started_jobs=started)
                self.applied = await self.writer.commit_after(batch, self.applied)
            elif batch.empty:
                return
            else:
                await self.writer.commit(batch)
        except BaseException:
            self._id_mark.mark, self._job_mark.mark = marks
            raise
        if batch.id_prefix is not None:
            self._prefix_stored = True

    def absorb(self, changes: list[Change]) -> tuple[list[Effect], list[Worker]]:
        """Take in other replicas' committed changes, in order: the effects for this replica
        (jobs of its own to cancel, workers to forget) and the workers now draining. Every
        change is decoded before any is taken in: one that cannot be read (not written by a
        gateway of this version) raises ``StoreError`` and nothing changes."""
        decoded = [(change, self._decode(change)) for change in changes]
        effects: list[Effect] = []
        touched: set[WorkerId] = set()
        for change, upserts in decoded:
            if change.seq <= self.applied and not change.full:
                continue
            effects += self._table.absorb(
                upserts,
                change.deletes,
                next_job_id=change.next_job_id,
                everything=change.full,
            )
            if change.replica and change.replica == self.replica:
                effects += self._restart_jobs(upserts)
            self._ids.count = max(self._ids.count, change.id_high_water)
            self.applied = change.seq
            touched.update(upserts)
        draining = [
            worker
            for worker_id in touched
            if (worker := self._table.get(worker_id)) is not None
            and worker.status is WorkerStatus.DRAINING
        ]
        return effects, draining

    def _restart_jobs(
        self, upserts: dict[WorkerId, tuple[Worker, WorkerSpec | None]]
    ) -> list[Effect]:
        """Our own change, coming back: its commit was answered with an error (a connection
        lost during COMMIT) but had gone through, so the jobs it started were never run, and
        no one else will claim them (this replica is alive). Run them now."""
        starts: list[Effect] = []
        for worker_id, (worker, replacing) in upserts.items():
            job = worker.job
            if job is None or not job.active or job.job_type is JobType.REMOVE:
                continue
            spec = replacing if job.job_type is JobType.REPLACE and replacing else worker.spec
            starts.append(
                StartJob(worker_id=worker_id, job_id=job.job_id, job_type=job.job_type, spec=spec)
            )
        return starts

    def _decode(self, change: Change) -> dict[WorkerId, tuple[Worker, WorkerSpec | None]]:
        upserts = {}
        for worker_id, plain in change.upserts.items():
            try:
                worker = worker_from_plain(plain)
                replacing = plain.get("replacing")
                spec = None if replacing is None else spec_from_plain(replacing)
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                where = f"change {change.seq}, worker {worker_id}"
                raise StoreError("the shared store", f"{where}: unreadable: {error!r}") from None
            if worker.id != worker_id:
                raise StoreError("the shared store", f"change {change.seq}: ids disagree")
            upserts[worker_id] = (worker, spec)
        return upserts


async def run_registry(
    inbox: Inbox,
    jobs_send: JobsSend,
    publish: Callable[[RegistrySnapshot], None],
    *,
    table: WorkerTable,
    drains: Drainer,
    journal: Journal | None = None,
    on_removed: Callable[[WorkerId], None] = lambda worker_id: None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``journal``: the store the batches go to (None: none, nothing is written). The table's
    pending effects when it starts (a recovery's restarted jobs) are carried out at once."""
    jobs: dict[WorkerId, Job] = {}  # the job currently working on each worker
    backlog: deque[Job] = deque()  # started jobs waiting for room in the jobs channel
    effects: list[Effect] = []  # the current batch's, carried out after its commit
    drained: list[Worker] = []  # workers the current batch began draining (busy ones)

    def carry_out(effects: list[Effect], drained: list[Worker]) -> None:
        for effect in effects:
            match effect:
                case StartJob(worker_id=worker_id):
                    jobs[worker_id] = job = Job(effect)
                    backlog.append(job)
                case CancelJob(worker_id=worker_id, job_id=job_id):
                    if job_id is None:  # the worker is gone
                        on_removed(worker_id)
                        drains.forget(worker_id)
                    running = jobs.get(worker_id)
                    if running is not None and job_id in (None, running.start.job_id):
                        del jobs[worker_id]
                        running.cancel_scope.cancel()  # a job still in the backlog ends at once
        for worker in drained:
            drains.start(worker)  # no-op when it is draining already
        while backlog:
            try:
                jobs_send.send_nowait(backlog[0])
            except trio.WouldBlock:
                break
            backlog.popleft()

    def apply(message: object) -> outcome.Outcome[object]:
        if isinstance(message, Sync):
            return outcome.Value(None)
        free = 0
        if isinstance(message, _STARTS_JOBS):  # room left once the backlog and this batch's
            starts = sum(isinstance(effect, StartJob) for effect in effects)  # jobs are in
            free = max(_free_slots(jobs_send) - len(backlog) - starts, 0)
        try:
            worker = table.apply(message, now=clock(), job_slots=free)  # type: ignore[arg-type]
            if isinstance(message, BeginDrain) and worker.status is WorkerStatus.DRAINING:
                if drains.removable_now(worker):
                    table.finish_drain(worker.id)  # nothing in flight: gone now
                else:
                    drained.append(worker)
            result: outcome.Outcome[object] = outcome.Value(worker)
        except GatewayError as error:  # an expected "no" goes back to the asker
            result = outcome.Error(error)
        effects.extend(table.take_effects())  # anything else is a bug: crash loudly
        return result

    def take_in(changes: list[Change]) -> None:
        """Other replicas' changes: into the table, shown, then their effects here."""
        assert journal is not None
        taken_in = journal.absorb(changes)
        publish(table.snapshot())  # what routing sees first: then the effects
        carry_out(*taken_in)

    async def decide_locked(batch: list[Envelope[object]]) -> list[outcome.Outcome[object]]:
        """Decide ``batch`` again and commit it inside the writers' lock (``commit_decided``):
        the store reads what others committed meanwhile, and ``decide`` (on this thread, while
        this task waits for the store) takes it in and applies the batch once more. On any
        error the decision is taken back (what was taken in stays: it is stored)."""
        assert journal is not None
        decided: list[outcome.Outcome[object]] = []
        made: list[Changes] = []

        def decide(more: list[Change]) -> Batch:
            if more:
                take_in(more)
            effects.clear()
            drained.clear()
            decided[:] = [apply(queued.message) for queued in batch]
            made.append(table.take_changes())
            started = {e.worker_id: e.job_id for e in effects if isinstance(e, StartJob)}
            return journal.shared_batch(made[-1], started)

        try:
            await journal.commit_decided(decide)
        except BaseException:
            if made:
                table.undo(made[-1])
            raise
        return decided

    async def handle(batch: list[Envelope[object]]) -> None:
        fresh = False  # True once this batch took in other replicas' changes
        for catch_ups in range(MAX_CATCH_UPS + 1):
            effects.clear()
            drained.clear()
            results = [apply(queued.message) for queued in batch]
            changes = table.take_changes()
            if journal is None:
                break
            try:
                started = {e.worker_id: e.job_id for e in effects if isinstance(e, StartJob)}
                await journal.commit(changes, fresh=fresh, started_jobs=started)
                break
            except Behind as behind:  # decided on a stale table: take the news in, again
                table.undo(changes)
                try:
                    take_in(behind.changes)
                    fresh = True
                    if journal.decides:  # again, inside the writers' lock: never behind
                        results = await decide_locked(batch)
                        break
                    if catch_ups < MAX_CATCH_UPS:
                        continue
                    error: StoreError | None = None
                except Behind as too_far:  # the log no longer reached back: everything
                    table.undo(table.take_changes())
                    try:
                        take_in(too_far.changes)
                    except StoreError as unreadable:
                        error = unreadable
                    else:
                        if catch_ups < MAX_CATCH_UPS:
                            continue
                        error = None
                except StoreError as unreadable:
                    error = unreadable
            except StoreError as refused:
                table.undo(changes)
                error = refused
            if error is not None:
                log.error("%s; %d asks answered 503, nothing changed", error, len(batch))
            else:
                log.error("other replicas kept committing; %d asks answered 503", len(batch))
            if fresh:
                publish(table.snapshot())  # what was taken in from other replicas
            for queued in batch:
                queued.reply.answer(outcome.Error(StoreUnavailable()))
            return
        # stored: from here to the replies, no checkpoint
        publish(table.snapshot())  # before the replies: read-your-writes
        carry_out(list(effects), list(drained))
        for queued, result in zip(batch, results, strict=True):
            queued.reply.answer(result)

    publish(table.snapshot())
    draining = [w for w in table.workers.values() if w.status is WorkerStatus.DRAINING]
    carry_out(table.take_effects(), draining)  # a shared store's drains in progress
    task_status.started()
    with inbox, jobs_send:
        try:
            async for envelope in inbox:
                batch = [envelope]  # whatever else is queued already: one commit for all
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:
                    await handle(batch)
                finally:
                    for queued in batch:
                        queued.reply.refuse()  # no-op for the answered ones
        finally:
            refuse_pending(inbox)
            for job in jobs.values():
                job.cancel_scope.cancel()


def _free_slots(jobs_send: JobsSend) -> int:
    stats = jobs_send.statistics()
    return int(stats.max_buffer_size - stats.current_buffer_used)
