"""run_registry(): the actor that owns the WorkerTable.

It takes one envelope at a time from its bounded inbox, applies the command to the table (sync,
so atomic), carries out the table's effects (queue a job with ``send_nowait``, cancel a job's
scope), publishes the new snapshot, and only then answers: a client that got its reply reads its
own write. It never awaits anyone but its inbox, so asks cannot deadlock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import outcome
import trio

from actors.commands import CancelJob, StartJob
from actors.errors import GatewayError
from actors.mailbox import Inbox, refuse_pending
from actors.model import WorkerId
from actors.snapshot import RegistrySnapshot
from actors.table import WorkerTable

log = logging.getLogger("tmg.registry")


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
                    running = jobs.get(worker_id)
                    if running is not None and job_id in (None, running.start.job_id):
                        del jobs[worker_id]
                        running.cancel_scope.cancel()

    publish(table.snapshot())
    task_status.started()
    with inbox, jobs_send:
        try:
            async for envelope in inbox:
                with envelope.reply:
                    stats = jobs_send.statistics()
                    free = stats.max_buffer_size - stats.current_buffer_used
                    try:
                        result: outcome.Outcome[object] = outcome.Value(
                            table.apply(envelope.message, now=clock(), job_slots=int(free))  # type: ignore[arg-type]
                        )
                    except GatewayError as error:  # an expected "no" goes back to the asker
                        result = outcome.Error(error)
                    carry_out_effects()
                    publish(table.snapshot())  # before the reply: read-your-writes
                    envelope.reply.answer(result)
        finally:
            refuse_pending(inbox)
            for job in jobs.values():
                job.cancel_scope.cancel()
