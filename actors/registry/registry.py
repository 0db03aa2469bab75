"""run_registry(): the actor that owns the WorkerTable.

It takes one envelope at a time from its bounded inbox, applies the command to the table (sync,
so atomic; a drain of a worker with nothing in flight completes in the same step), carries out
the table's effects (queue a job with ``send_nowait``, cancel a job's scope), publishes the new
snapshot, and only then answers: a client that got its reply reads its own write. When several
asks are queued it applies them all, in order, and publishes once before answering them. It never
awaits anyone but its inbox, so asks cannot deadlock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import outcome
import trio

from actors.core.commands import (
    BeginDrain,
    CancelJob,
    CreateWorker,
    RecheckWorker,
    ReplaceSpec,
    RetryWorker,
    StartJob,
)
from actors.core.errors import GatewayError
from actors.core.model import Worker, WorkerId, WorkerStatus
from actors.core.snapshot import RegistrySnapshot
from actors.core.table import WorkerTable
from actors.registry.mailbox import Inbox, refuse_pending

log = logging.getLogger("tmg.registry")
_STARTS_JOBS = (CreateWorker, ReplaceSpec, RetryWorker, RecheckWorker)
MAX_BATCH = 64  # commands applied between two publishes when asks queue up


@dataclass(slots=True)
class Job:
    """A queued workflow: the table's StartJob plus the cancel scope its task will run in."""

    start: StartJob
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


JobsSend = trio.MemorySendChannel[Job]
JobsReceive = trio.MemoryReceiveChannel[Job]


async def run_registry(
    inbox: Inbox,
    jobs_send: JobsSend,
    publish: Callable[[RegistrySnapshot], None],
    *,
    table: WorkerTable,
    is_idle: Callable[[WorkerId], bool],
    on_removed: Callable[[WorkerId], None] = lambda worker_id: None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    jobs: dict[WorkerId, Job] = {}  # the job currently working on each worker

    def carry_out_effects() -> None:
        for effect in table.take_effects():
            match effect:
                case StartJob(worker_id=worker_id):
                    jobs[worker_id] = job = Job(effect)
                    jobs_send.send_nowait(job)  # the table checked there is room
                case CancelJob(worker_id=worker_id, job_id=job_id):
                    if job_id is None:  # the worker is gone
                        on_removed(worker_id)
                    running = jobs.get(worker_id)
                    if running is not None and job_id in (None, running.start.job_id):
                        del jobs[worker_id]
                        running.cancel_scope.cancel()

    def apply(message: object) -> outcome.Outcome[object]:
        free = _free_slots(jobs_send) if isinstance(message, _STARTS_JOBS) else 0
        try:
            worker = table.apply(message, now=clock(), job_slots=free)  # type: ignore[arg-type]
            if isinstance(message, BeginDrain) and _idle_now(worker, is_idle):
                table.finish_drain(worker.id)  # nothing in flight: gone now
            result: outcome.Outcome[object] = outcome.Value(worker)
        except GatewayError as error:  # an expected "no" goes back to the asker
            result = outcome.Error(error)
        carry_out_effects()  # anything else is a bug: crash loudly (the finally below answers)
        return result

    publish(table.snapshot())
    task_status.started()
    with inbox, jobs_send:
        try:
            async for envelope in inbox:
                batch = [envelope]  # whatever else is queued already: one publish for all
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:
                    results = [apply(queued.message) for queued in batch]
                    publish(table.snapshot())  # before the replies: read-your-writes
                    for queued, result in zip(batch, results, strict=True):
                        queued.reply.answer(result)
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


def _idle_now(worker: Worker, is_idle: Callable[[WorkerId], bool]) -> bool:
    """A worker that just began draining with nothing in flight and no settle delay is
    removed in the same step: no request can be routed to it in between."""
    return (
        worker.status is WorkerStatus.DRAINING
        and not worker.spec.health.drain_settle_secs
        and is_idle(worker.id)
    )
