"""RegistrySnapshot: the frozen read view the registry publishes after every command (pure).

GETs and (later) the routing hot path read the latest snapshot without asking the registry, so
reads never queue behind writes. A snapshot is never mutated; the registry publishes a new one
before it replies, so a client that got its answer reads its own write.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from actors.core.model import Worker, WorkerId, WorkerStatus, WorkerType


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrySnapshot:
    version: int = 0
    workers: Mapping[WorkerId, Worker] = field(default_factory=dict)
    by_key: Mapping[str, WorkerId] = field(default_factory=dict)
    by_model: Mapping[str, tuple[WorkerId, ...]] = field(default_factory=dict)  # ready workers

    def get(self, worker_id: WorkerId) -> Worker | None:
        return self.workers.get(worker_id)

    def select(
        self,
        *,
        model: str | None = None,
        status: WorkerStatus | None = None,
        worker_type: WorkerType | None = None,
    ) -> list[Worker]:
        """Workers in registration order; ``model`` matches any worker that lists the model,
        whatever its status, or whose spec names it."""
        chosen = []
        for worker in self.workers.values():
            if status is not None and worker.status is not status:
                continue
            if worker_type is not None and worker.spec.worker_type is not worker_type:
                continue
            if (
                model is not None
                and model not in worker.model_ids
                and model != worker.spec.model_id
            ):
                continue
            chosen.append(worker)
        return chosen

    def ready_for_model(self, model: str) -> list[Worker]:
        return [self.workers[worker_id] for worker_id in self.by_model.get(model, ())]


def count_stats(workers: list[Worker]) -> dict[str, object]:
    """The ``stats`` block of GET /workers (smg's fields plus counts by status)."""
    by_type = Counter(worker.spec.worker_type for worker in workers)
    by_status = Counter(worker.status.value for worker in workers)
    return {
        "prefill_count": by_type[WorkerType.PREFILL],
        "decode_count": by_type[WorkerType.DECODE],
        "regular_count": by_type[WorkerType.REGULAR],
        "by_status": {status.value: by_status[status.value] for status in WorkerStatus},
    }
