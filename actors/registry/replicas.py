"""The tasks a replica runs beside its registry when the store is shared (PostgreSQL, or a
SQLite file several processes of one host open: ``tmg serve --processes``).

* ``run_change_follower``: waits for the store's notifications of other replicas' commits (on
  its own connection, in a thread of its own) and then asks the registry to ``Sync`` (take in
  every change it has not seen, in order: ``Journal.absorb``). Without a notification it asks
  anyway every ``poll_secs``: a lost notification (a dropped connection) costs at most that
  long. While the store cannot be reached it retries with backoff; the replica keeps serving
  what it has.
* ``run_replica_duties``: every ``interval_secs``, records this replica as alive (a replica
  whose heartbeat is older than the store's lease is gone: it holds no drain and its jobs are
  taken over), takes or keeps the ``health`` lease (``Duties.health``: only its holder probes
  workers), and claims the jobs of replicas that are gone (and those its own name held before
  a restart: ``join`` at start-up) and has the registry run each again (``take_over``: False
  when the job turned out to be over, and its record is dropped; a take-over the registry
  could not make now is tried again at the next round).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from actors.core.model import WorkerId
from actors.store.base import StoreError
from actors.store.writer import StoreWriter

log = logging.getLogger("tmg.replicas")
MAX_BACKOFF_SECS = 2.0
CLAIM_LIMIT = 64  # jobs claimed per round
WAIT_SECS = 0.2  # one wait for a notification (then the next)


async def run_change_follower(
    store: Any,
    sync: Callable[[], None],
    *,
    poll_secs: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``store``: a ``SharedStore``; ``sync``: posts a Sync to the registry without waiting."""
    task_status.started()
    failures = 0
    synced = trio.current_time()
    while True:
        try:
            # short waits: the thread is free again soon when the gateway stops
            notified = await trio.to_thread.run_sync(
                store.wait_for_changes, WAIT_SECS, abandon_on_cancel=True
            )
            failures = 0
        except StoreError as error:
            failures += 1
            if failures == 1:
                log.warning("%s; retrying", error)
            await trio.sleep(min(0.1 * 2**failures, MAX_BACKOFF_SECS))
            notified = True  # after a reconnect: look
        if notified or trio.current_time() - synced >= poll_secs:
            synced = trio.current_time()
            sync()


class TakeOverLater(Exception):
    """The registry could not take the job over now (busy, store refused): try again."""


@dataclass(slots=True)
class Duties:
    """What this replica currently does for all: ``health`` while it holds the lease."""

    health: bool = False
    retry: set[tuple[WorkerId, int]] = field(default_factory=set)


async def run_replica_duties(
    writer: StoreWriter,
    store: Any,
    duties: Duties,
    take_over: Callable[[WorkerId, int], Awaitable[bool]],
    *,
    interval_secs: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    while True:
        claimed: list[tuple[WorkerId, int]] = []
        try:
            await writer.call(store.heartbeat)
            duties.health = await writer.call(partial(store.hold_lease, "health"))
            claimed = await writer.call(partial(store.claim_jobs, CLAIM_LIMIT))
        except StoreError as error:
            duties.health = False  # the lease may be someone else's by now: do not probe
            log.warning("replica duties: %s", error)
        for worker_id, job_id in [*duties.retry, *claimed]:
            duties.retry.discard((worker_id, job_id))
            try:
                if not await take_over(worker_id, job_id):
                    await writer.call(partial(store.release_job, worker_id, job_id))
                else:
                    log.info("worker %s: took over job %d from a gone replica", worker_id, job_id)
            except (TakeOverLater, StoreError):
                duties.retry.add((worker_id, job_id))
        await trio.sleep(interval_secs)
