"""InFlight: per-worker counts of requests the data plane is proxying (sync, trio-atomic).

Not registry state: the data plane increments and decrements without asking anyone, and the
drain step waits here for a worker's count to reach zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

from actors.core.model import WorkerId


class InFlight:
    def __init__(self) -> None:
        self._counts: dict[WorkerId, int] = {}
        self._idle: dict[WorkerId, trio.Event] = {}

    def counts(self) -> dict[WorkerId, int]:
        """Every worker with requests in flight, and how many (a copy)."""
        return dict(self._counts)

    def count(self, worker_id: WorkerId) -> int:
        return self._counts.get(worker_id, 0)

    def acquire(self, worker_id: WorkerId) -> None:
        self._counts[worker_id] = self._counts.get(worker_id, 0) + 1

    def release(self, worker_id: WorkerId) -> None:
        left = self._counts[worker_id] - 1
        if left:
            self._counts[worker_id] = left
            return
        del self._counts[worker_id]
        if (event := self._idle.pop(worker_id, None)) is not None:
            event.set()

    @contextmanager
    def track(self, worker_id: WorkerId) -> Iterator[None]:
        self.acquire(worker_id)
        try:
            yield
        finally:
            self.release(worker_id)

    async def wait_idle(self, worker_id: WorkerId) -> None:
        while self.count(worker_id):
            event = self._idle.setdefault(worker_id, trio.Event())
            await event.wait()
