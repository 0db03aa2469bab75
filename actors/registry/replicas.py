"""The tasks a replica runs beside its registry when the store is shared (PostgreSQL).

* ``run_change_follower``: waits for the store's notifications of other replicas' commits (on
  its own connection, in a thread of its own) and then asks the registry to ``Sync`` (take in
  every change it has not seen, in order: ``Journal.absorb``). Without a notification it asks
  anyway every ``poll_secs``: a lost notification (a dropped connection) costs at most that
  long. While the store cannot be reached it retries with backoff; the replica keeps serving
  what it has.
* ``run_heartbeat``: records this replica as alive every ``interval_secs``; a replica whose
  heartbeat is older than the store's lease is not counted for drains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from actors.store.base import StoreError
from actors.store.writer import StoreWriter

log = logging.getLogger("tmg.replicas")
MAX_BACKOFF_SECS = 2.0


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
    while True:
        try:
            await trio.to_thread.run_sync(store.wait_for_changes, poll_secs, abandon_on_cancel=True)
            failures = 0
        except StoreError as error:
            failures += 1
            if failures == 1:
                log.warning("%s; retrying", error)
            await trio.sleep(min(0.1 * 2**failures, MAX_BACKOFF_SECS))
        sync()


async def run_heartbeat(
    writer: StoreWriter,
    store: Any,
    *,
    interval_secs: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    while True:
        await trio.sleep(interval_secs)
        try:
            await writer.call(store.heartbeat)
        except StoreError as error:
            log.warning("heartbeat: %s", error)
