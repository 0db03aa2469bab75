"""MemoryStore: no state outside the process (the default; today's behaviour).

``load()`` gives an empty state and ``commit()`` keeps nothing: it only checks the batch's shape
(cheap, O(changed rows)), so a caller that builds batches wrongly fails in the in-memory tests
too, not only with a file. Its calls take microseconds, so ``blocking`` is False and the writer
runs them inline on the event loop.
"""

from __future__ import annotations

from actors.store.base import Batch, StoredState, validate_batch


class MemoryStore:
    blocking = False

    def __init__(self) -> None:
        self.closed = False

    def load(self) -> StoredState:
        return StoredState(workers={})

    def commit(self, batch: Batch) -> None:
        if self.closed:
            raise RuntimeError("commit on a closed MemoryStore")
        validate_batch(batch)

    def close(self) -> None:
        self.closed = True
