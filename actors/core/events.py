"""Change events: what changed between two published snapshots, one event per worker (pure).

The registry publishes a snapshot after each batch of commands; ``diff(previous, current)``
turns the pair into the events a watcher sees (``GET /workers/events``, ``gateway.watch()``):

* a worker id absent before and present now: ``created`` (whatever its status: a worker that
  was created and became ready within one batch is one ``created`` whose record says ``ready``);
* present before and absent now: ``removed``, carrying the last record it had;
* present in both with a different record: the new status's kind when the status changed to
  ``ready``, ``failed`` or ``draining``; else ``updated`` (a PATCH, a PUT's spec swap, a health
  flip, a job's progress, and ``failed`` → ``pending`` on a retry).

Order, the same for every watcher: removals first, in the previous snapshot's order, then the
rest in the current snapshot's (registration) order. Removals go first so that a batch that
removes an address and registers it again reads, in order, as "gone" then "new".

Two more kinds are markers, never produced by ``diff``: ``synced`` (the initial state has been
sent: what follows are changes) and ``reset`` (a resume point was too old or unknown: forget
what you had, the full state follows).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from actors.core.model import Worker, WorkerStatus, WorkerType
from actors.core.snapshot import RegistrySnapshot


class EventKind(StrEnum):
    CREATED = "created"
    READY = "ready"
    FAILED = "failed"
    UPDATED = "updated"
    DRAINING = "draining"
    REMOVED = "removed"
    SYNCED = "synced"  # marker: the initial state is complete
    RESET = "reset"  # marker: the resume point is gone; the full state follows


WORKER_KINDS = frozenset(EventKind) - {EventKind.SYNCED, EventKind.RESET}
_STATUS_KIND = {
    WorkerStatus.PENDING: EventKind.CREATED,
    WorkerStatus.READY: EventKind.READY,
    WorkerStatus.FAILED: EventKind.FAILED,
    WorkerStatus.DRAINING: EventKind.DRAINING,
}


@dataclass(frozen=True, slots=True)
class Change:
    """One worker's change. ``worker`` is the new record (the last one for ``removed``);
    ``before`` the previous record (None for ``created``), which filters also look at, so a
    worker that leaves a filter (a PUT to another model) is seen leaving."""

    kind: EventKind
    worker: Worker
    before: Worker | None = None


def status_kind(worker: Worker) -> EventKind:
    """The kind that describes a worker's current state in an initial-state event."""
    return _STATUS_KIND[worker.status]


def diff(
    previous: RegistrySnapshot,
    current: RegistrySnapshot,
    changed: Collection[str] | None = None,
) -> list[Change]:
    """The changes from ``previous`` to ``current``, in the order the module docstring gives.

    ``changed``, when the caller knows it (the ids a batch touched), limits the comparison to
    those ids, taken in the order given: O(batch) instead of O(workers). Without it every id
    is compared (by identity first: the table keeps the record object of an untouched
    worker)."""
    old, new = previous.workers, current.workers
    if old is new:
        return []
    if changed is not None:
        gone = [old[w] for w in changed if w in old and w not in new]  # in the given order
        candidates = [w for w in changed if w in new]
    else:
        gone = [worker for worker_id, worker in old.items() if worker_id not in new]
        candidates = list(new)
    changes = [Change(EventKind.REMOVED, worker, worker) for worker in gone]
    for worker_id in candidates:
        worker = new[worker_id]
        before = old.get(worker_id)
        if before is None:
            changes.append(Change(EventKind.CREATED, worker))
        elif before is not worker and before != worker:
            changes.append(Change(_kind(before, worker), worker, before))
    return changes


def _kind(before: Worker, after: Worker) -> EventKind:
    if before.status is not after.status and after.status is not WorkerStatus.PENDING:
        return _STATUS_KIND[after.status]
    return EventKind.UPDATED


def matches(worker: Worker, model: str | None, worker_type: WorkerType | None) -> bool:
    """The filters of ``GET /workers`` (model: listed by the worker, or named by its spec)."""
    if worker_type is not None and worker.spec.worker_type is not worker_type:
        return False
    return model is None or model in worker.model_ids or model == worker.spec.model_id
