"""StoreWriter: a store's blocking calls, run in one dedicated thread, awaited from trio.

``open_store_writer(open_store)`` starts one thread, opens the store in it (opening may block
too: locking, inspecting, migrating), and gives a ``StoreWriter`` whose ``load``, ``commit``
and ``aclose`` hand the call to that thread through a queue and sleep until it reschedules
them. One thread, first in first out: two calls never overlap and run in the order they were
made, and the event loop never blocks on the disk. A store whose ``blocking`` is False (the
in-memory store) is called inline instead and the thread stops after opening it: its calls
take microseconds, and the registry keeps today's behaviour (no checkpoint between applying a
batch and publishing it).

**Cancellation.** A call, once made, runs to its end, and its caller waits for it even if it is
cancelled meanwhile: the wait cannot be aborted (``Abort.FAILED``, the low-level form of a
shielded scope). The cancellation is delivered at the caller's next checkpoint, after the
call returned. For ``commit`` this is the point: the registry must neither publish a change
that is not stored nor lose one that is, so a cancelled registry still gets its commit's
result, publishes and answers that batch (synchronous steps, no checkpoint), and stops at its
next await. The price: a cancelled caller waits for one commit (or for a hung disk).

**Why a dedicated thread and not ``trio.to_thread.run_sync`` with ``CapacityLimiter(1)``.**
Both serialise the calls; measured on this machine (2 shared cores, ``scripts/bench_store.py``,
``call_round_trip_us``), the round trip of a no-op call costs about 60 µs idle and 150-170 µs
under load through the dedicated thread, against 125 µs idle and 350-420 µs under load through
``to_thread`` (limiter, thread-cache hand-off, cancel-scope bookkeeping); the SQLite commit of
one changed worker is itself about 20-60 µs. The dedicated thread costs about half, so it is used.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import outcome
import trio

from actors.store.base import Batch, Store, StoredState

T = TypeVar("T")
_Call = tuple[Callable[[], Any], trio.lowlevel.Task]


class WriterThread:
    """One thread running calls from a queue; each result goes back to the waiting task."""

    def __init__(self, token: trio.lowlevel.TrioToken, name: str = "tmg-store-writer") -> None:
        self._token = token
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, function: Callable[[], T]) -> T:
        """Run ``function`` in the thread and return its result (or raise its error). Not
        abortable: see the module docstring."""
        self._calls.put((function, trio.lowlevel.current_task()))
        result: T = await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED
        )
        return result

    def stop(self) -> None:
        """The thread ends after the calls already queued (it is never joined: it holds no
        lock and nothing waits for it)."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            function, task = call
            result = outcome.capture(function)
            try:
                self._token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the run ended without waiting for us: nobody to tell
                return


class StoreWriter:
    """The async face of a ``Store`` (see the module docstring)."""

    def __init__(self, store: Store, thread: WriterThread | None) -> None:
        self.store = store
        self._thread = thread
        self._closed = False

    async def load(self) -> StoredState:
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self._call(self.store.load)

    async def commit(self, batch: Batch) -> None:
        """Store ``batch`` as one transaction; runs to its end once called (see above)."""
        await self._call(partial(self.store.commit, batch))

    async def commit_after(self, batch: Batch, after: int) -> int:
        """A shared store's ``commit_after`` (``actors.store.base.SharedStore``); runs to its
        end once called, as ``commit``."""
        store: Any = self.store
        result: int = await self._call(partial(store.commit_after, batch, after))
        return result

    async def call(self, function: Callable[[], T]) -> T:
        """Any other blocking call on the store, in the writer's thread, in turn."""
        return await self._call(function)

    async def aclose(self) -> None:
        """Close the store (releases its file lock); idempotent, runs to its end."""
        if self._closed:
            return
        self._closed = True
        await self._call(self.store.close)

    async def _call(self, function: Callable[[], T]) -> T:
        if self._thread is None:
            return function()
        return await self._thread.run(function)


@asynccontextmanager
async def open_store_writer(open_store: Callable[[], Store]) -> AsyncIterator[StoreWriter]:
    """Open a store in the writer thread (``open_store`` is e.g. ``partial(SqliteStore,
    path)``) and close it on the way out, even when cancelled."""
    thread: WriterThread | None = WriterThread(trio.lowlevel.current_trio_token())
    assert thread is not None
    try:
        store = await thread.run(open_store)
        if not store.blocking:
            thread.stop()
            thread = None
        writer = StoreWriter(store, thread)
        try:
            yield writer
        finally:
            await writer.aclose()
    finally:
        if thread is not None:
            thread.stop()
