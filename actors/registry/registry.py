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

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import outcome
import trio

from actors.core.codec import stored_worker
from actors.core.commands import (
    BeginDrain,
    CancelJob,
    CreateWorker,
    Effect,
    RecheckWorker,
    ReplaceSpec,
    RetryWorker,
    StartJob,
)
from actors.core.errors import GatewayError
from actors.core.jobs import UuidSource
from actors.core.model import Worker, WorkerId, WorkerStatus
from actors.core.snapshot import RegistrySnapshot
from actors.core.table import Changes, WorkerTable
from actors.registry.drain import Drainer
from actors.registry.mailbox import Envelope, Inbox, refuse_pending
from actors.store.base import Batch, Reservation, StoredState, StoreError
from actors.store.writer import StoreWriter

log = logging.getLogger("tmg.registry")
_STARTS_JOBS = (CreateWorker, ReplaceSpec, RetryWorker, RecheckWorker)
MAX_BATCH = 64  # commands applied between two publishes when asks queue up
RESERVATION_BLOCK = 1000  # ids and job ids reserved ahead in the store (actors/store/base.py)


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
    prefix in the first batch when it is new."""

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
        self._table = table
        self._ids = ids
        self._id_mark = Reservation(stored.id_high_water, block)
        self._job_mark = Reservation(stored.next_job_id, block)
        self._prefix_stored = stored.id_prefix == ids.prefix

    def batch(self, changes: Changes) -> Batch:
        table = self._table
        return Batch(
            upserts={worker_id: stored_worker(table, worker_id) for worker_id in changes.upserted},
            deletes=changes.deleted,
            id_prefix=None if self._prefix_stored else self._ids.prefix,
            id_high_water=self._id_mark.advance(self._ids.count),
            next_job_id=self._job_mark.advance(table.next_job_id),
        )

    async def commit(self, changes: Changes) -> None:
        """Write ``changes`` as one transaction (nothing, without a checkpoint, when there is
        nothing to write). On any error the reservations are as before (the marks the batch
        would have stored are not held by the store) and the error propagates."""
        marks = self._id_mark.mark, self._job_mark.mark
        try:
            batch = self.batch(changes)
            if batch.empty:
                return
            await self.writer.commit(batch)
        except BaseException:
            self._id_mark.mark, self._job_mark.mark = marks
            raise
        if batch.id_prefix is not None:
            self._prefix_stored = True


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

    async def handle(batch: list[Envelope[object]]) -> None:
        effects.clear()
        drained.clear()
        results = [apply(queued.message) for queued in batch]
        changes = table.take_changes()
        if journal is not None:
            try:
                await journal.commit(changes)
            except StoreError as error:
                table.undo(changes)
                log.error("%s; %d asks answered 503, nothing changed", error, len(batch))
                for queued in batch:
                    queued.reply.answer(outcome.Error(StoreUnavailable()))
                return
        # stored: from here to the replies, no checkpoint
        publish(table.snapshot())  # before the replies: read-your-writes
        carry_out(list(effects), list(drained))
        for queued, result in zip(batch, results, strict=True):
            queued.reply.answer(result)

    publish(table.snapshot())
    carry_out(table.take_effects(), [])
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
