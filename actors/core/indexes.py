"""WorkerIndexes: the worker records and every index over them, kept in step (pure).

Every change is ``put`` (overwrite the record, then diff the indexes) or ``delete``, in one
synchronous call, so no index ever lags its record. Indexes: by address key (every worker), by
model (READY workers only: the routable set), by worker type, by connection mode.
"""

from __future__ import annotations

from typing import TypeVar

from actors.core.model import ConnectionMode, Worker, WorkerId, WorkerStatus, WorkerType
from actors.core.snapshot import RegistrySnapshot

K = TypeVar("K")


class WorkerIndexes:
    def __init__(self) -> None:
        self.workers: dict[WorkerId, Worker] = {}
        self.by_key: dict[str, WorkerId] = {}
        self.by_model: dict[str, set[WorkerId]] = {}
        self.by_type: dict[WorkerType, set[WorkerId]] = {}
        self.by_mode: dict[ConnectionMode, set[WorkerId]] = {}
        self.version = 0
        self._snapshot: RegistrySnapshot | None = None

    def put(self, worker: Worker) -> Worker:
        old = self.workers.get(worker.id)
        self.workers[worker.id] = worker
        self._changed()
        if old is None:
            self.by_key[worker.key] = worker.id
        elif _same_indexed(old, worker):
            return worker  # an update that moves no index entry
        self._reindex(old, worker, worker.id)
        return worker

    def delete(self, worker: Worker) -> None:
        del self.workers[worker.id]
        del self.by_key[worker.key]
        self._changed()
        self._reindex(worker, None, worker.id)

    def key_index(self) -> dict[str, WorkerId]:
        return dict(self.by_key)

    def model_index(self) -> dict[str, frozenset[WorkerId]]:
        return {model: frozenset(ids) for model, ids in self.by_model.items()}

    def type_index(self) -> dict[WorkerType, frozenset[WorkerId]]:
        return {kind: frozenset(ids) for kind, ids in self.by_type.items()}

    def mode_index(self) -> dict[ConnectionMode, frozenset[WorkerId]]:
        return {mode: frozenset(ids) for mode, ids in self.by_mode.items()}

    def snapshot(self) -> RegistrySnapshot:
        """The frozen view of the current state (built once per change, then shared)."""
        if self._snapshot is None:
            self._snapshot = RegistrySnapshot(
                version=self.version,
                workers=dict(self.workers),
                by_key=dict(self.by_key),
                by_model={model: tuple(ids) for model, ids in self.by_model.items()},
            )
        return self._snapshot

    def _changed(self) -> None:
        self.version += 1
        self._snapshot = None

    def _reindex(self, old: Worker | None, new: Worker | None, worker_id: WorkerId) -> None:
        _diff(self.by_model, _models(old), _models(new), worker_id)
        _diff(self.by_type, _types(old), _types(new), worker_id)
        _diff(self.by_mode, _modes(old), _modes(new), worker_id)


def _same_indexed(old: Worker, new: Worker) -> bool:
    """True when every indexed attribute (status, models, type, mode, address) is unchanged."""
    return (
        old.status is new.status
        and old.detection is new.detection
        and old.spec.worker_type is new.spec.worker_type
        and old.spec.url == new.spec.url
    )


def _models(worker: Worker | None) -> frozenset[str]:
    if worker is None or worker.status is not WorkerStatus.READY:
        return frozenset()
    return worker.model_ids


def _types(worker: Worker | None) -> frozenset[WorkerType]:
    return frozenset() if worker is None else frozenset((worker.spec.worker_type,))


def _modes(worker: Worker | None) -> frozenset[ConnectionMode]:
    mode = None if worker is None else worker.connection_mode
    return frozenset() if mode is None else frozenset((mode,))


def _diff(
    index: dict[K, set[WorkerId]], old: frozenset[K], new: frozenset[K], worker_id: WorkerId
) -> None:
    for key in old - new:
        ids = index[key]
        ids.discard(worker_id)
        if not ids:
            del index[key]
    for key in new - old:
        index.setdefault(key, set()).add(worker_id)
