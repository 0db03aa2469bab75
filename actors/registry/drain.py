"""Draining: what happens between a DELETE of a ready worker and its removal, in one place.

The rules are the table's (pure, ``actors/core/table.py``): ``BeginDrain`` turns a ready worker
``draining`` (no new request is routed to it from that snapshot on) and removes a pending or
failed one at once; ``FinishDrain`` removes a worker that is still draining. The workflow in
between is the Drainer's, and the registry actor hands every drain to it in the same step as the
BeginDrain (so a drain is never lost, even if whoever sent the DELETE is gone before the reply):

* **Idle: removed at once.** A worker with nothing in flight and no settle time is removed by
  the registry in the same step as its BeginDrain (``removable_now``): no request can be routed
  to it in between, and the DELETE's 202 already says ``removed``. The data plane picks a worker
  and counts it in flight with no checkpoint in between, so "nothing in flight" is exact.
* **Busy: one task per draining worker** (``start``), in the gateway's nursery: it waits until
  the worker's in-flight count reaches 0, or for the worker's ``drain_timeout_secs`` (a warning
  is logged), then for ``health.drain_settle_secs``, then asks the registry for ``FinishDrain``.
  A second DELETE of a draining worker starts no second task. A FinishDrain that the registry
  refuses (the worker is gone already) is not an error.
* **Replicas** (a shared store): in-flight counts are per replica, so nothing is removed in the
  DELETE's step; every replica drains every worker it sees turn ``draining`` (its own DELETEs
  and those it takes in from the others), and once it has nothing in flight to it records so
  in the store (``record_idle``); the worker is removed when every live replica has recorded
  it (by the last one to record, at once), or at its drain timeout. A replica that stopped
  heartbeating is not live, so it never holds a drain.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from actors.core.errors import RegistryError
from actors.core.model import Worker, WorkerId, WorkerStatus
from actors.dataplane.inflight import InFlight

log = logging.getLogger("tmg.drain")


class Drainer:
    """Runs the drains of one gateway. ``finish`` asks the registry for FinishDrain."""

    def __init__(
        self,
        nursery: trio.Nursery,
        inflight: InFlight,
        finish: Callable[[WorkerId], Awaitable[object]],
        record_idle: Callable[[WorkerId], Awaitable[bool]] | None = None,
        idle_poll_secs: float = 1.0,
    ) -> None:
        """``record_idle``: with a shared store, records this replica idle for a worker and
        says whether every live replica is (see the module docstring); asked again every
        ``idle_poll_secs`` (the last replica to record finishes the drain at once: the poll
        only matters when a replica stops and its lease runs out)."""
        self._nursery = nursery
        self._inflight = inflight
        self._finish = finish
        self._record_idle = record_idle
        self._idle_poll_secs = idle_poll_secs
        self._draining: dict[WorkerId, trio.CancelScope] = {}  # each running drain's scope

    @property
    def draining(self) -> frozenset[WorkerId]:
        """The workers whose drain task is running."""
        return frozenset(self._draining)

    def forget(self, worker_id: WorkerId) -> None:
        """The worker is gone (removed here, or by another replica): its drain task, if one
        runs, ends now (sync: the registry calls it in the step that removed the worker)."""
        scope = self._draining.pop(worker_id, None)
        if scope is not None:
            scope.cancel()

    def removable_now(self, worker: Worker) -> bool:
        """True when a worker that just began draining can be removed in the same step: nothing
        in flight and no settle time to wait."""
        return (
            self._record_idle is None
            and worker.status is WorkerStatus.DRAINING
            and not worker.spec.health.drain_settle_secs
            and self._inflight.count(worker.id) == 0
        )

    def start(self, worker: Worker) -> None:
        """Drain ``worker`` in the background, unless it is draining already (sync: the
        registry calls it in the step that applied the BeginDrain)."""
        if worker.status is WorkerStatus.DRAINING and worker.id not in self._draining:
            scope = self._draining[worker.id] = trio.CancelScope()
            self._nursery.start_soon(self._drain, worker, scope)

    async def _drain(self, worker: Worker, scope: trio.CancelScope) -> None:
        spec = worker.spec
        try:
            with scope:
                idle = False
                with trio.move_on_after(spec.drain_timeout_secs or 0.0) as waited:
                    await self._inflight.wait_idle(worker.id)
                    idle = True
                    if self._record_idle is not None:
                        # the others' records are in the database: polled, no event to wait on
                        while not await self._record_idle(worker.id):  # noqa: ASYNC110
                            await trio.sleep(self._idle_poll_secs)
                if waited.cancelled_caught:
                    what = "other replicas" if idle else "requests in flight"
                    log.warning("worker %s: drain timed out waiting for %s", worker.id, what)
                await trio.sleep(spec.health.drain_settle_secs)
                try:
                    await self._finish(worker.id)
                except RegistryError as error:  # gone already
                    log.debug("finish drain of %s: %s", worker.id, error)
        finally:
            if self._draining.get(worker.id) is scope:
                del self._draining[worker.id]
