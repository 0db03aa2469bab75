"""The Feed: the registry's changes as numbered events, for watchers (gateway.watch(), SSE).

The registry calls ``publish(previous, current)`` synchronously after each batch, before the
replies (so a client that got its answer finds its change in the feed). ``publish`` never awaits
and costs the same whatever the watchers do:

* each change (``actors/core/events.py``) gets the next **sequence number** and goes into one
  shared ring of the last ``history`` events;
* every watcher has a cursor into that ring. A watcher more than ``subscriber_buffer`` events
  behind is dropped on the spot (``WatchOverflow`` on its next read; its drop callbacks run, so
  an SSE handler blocked on a client that does not read is cut at once). That is each
  watcher's bounded buffer: nothing is copied per watcher, and a stuck watcher never holds up
  the registry, nor more memory than the shared ring;
* one ``trio.Event`` wakes every waiting watcher.

**Sequence numbers** only grow, also across restarts: a feed starts at its creation time in
microseconds since the epoch (``start``). An id from a previous process is then older than this
feed's history (or newer than its head) and a resume from it is a ``reset``, never a silent
replay of unrelated numbers.

**A watch** (``async with feed.watch(model=, worker_type=, since=) as events``) yields
``WatchEvent``s: without ``since``, the current state (one event per worker, its status's kind:
pending workers as ``created``) then ``synced``, then every change in order. With ``since``
(the last sequence number seen): the changes after it from the history then ``synced``; or,
when the history no longer reaches back that far (or ``since`` is from another process),
``reset``, the full state, and ``synced``. Initial-state events carry the head's sequence
number and ``initial=True``. Filters use ``GET /workers``' rules and look at a change's record
before and after, so a worker that leaves the filter is seen leaving.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from actors.core.errors import GatewayError, InvalidInput
from actors.core.events import Change, EventKind, diff, matches, status_kind
from actors.core.model import Worker, WorkerType
from actors.core.snapshot import RegistrySnapshot

if TYPE_CHECKING:
    pass

HISTORY = 8192  # events kept for resumes (Last-Event-ID / since=)
SUBSCRIBER_BUFFER = 1024  # events a watcher may lag behind before it is dropped


class WatchOverflow(GatewayError):
    """The watcher fell more than its buffer behind the feed and was dropped. ``last_seq`` is
    the last sequence number it consumed: resume with ``since=last_seq`` (history permitting)."""

    code = "WATCH_OVERFLOW"
    status = 503

    def __init__(self, last_seq: int, buffer: int) -> None:
        super().__init__(
            f"the watcher fell more than {buffer} events behind the registry and was dropped; "
            f"resume from {last_seq}",
            last_seq=last_seq,
        )
        self.last_seq = last_seq


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a watch. ``worker`` is None for the markers (``synced``, ``reset``)."""

    kind: EventKind
    seq: int
    worker: Worker | None = None
    initial: bool = False  # part of the (initial or reset) full state


class _Subscriber:
    __slots__ = ("cursor", "dropped", "limit", "on_drop")

    def __init__(self, cursor: int, limit: int) -> None:
        self.cursor = cursor  # the last sequence number taken from the ring
        self.limit = limit
        self.dropped = False
        self.on_drop: list[Callable[[], object]] = []


class Feed:
    def __init__(
        self,
        snapshot: RegistrySnapshot | None = None,
        *,
        history: int = HISTORY,
        subscriber_buffer: int = SUBSCRIBER_BUFFER,
        start: int | None = None,
    ) -> None:
        if history < 1 or subscriber_buffer < 1:
            raise ValueError("history and subscriber_buffer must be at least 1")
        self._snapshot = snapshot or RegistrySnapshot()
        self._history = history
        self.subscriber_buffer = subscriber_buffer  # read when a watch starts
        self._start = time.time_ns() // 1000 if start is None else start
        self._seq = self._start  # the last number given out
        self._ring: list[Change | None] = [None] * history
        self._subscribers: set[_Subscriber] = set()
        self._wakeup: trio.Event | None = None  # created when someone waits
        self._closed = False

    # ---- the registry's side ------------------------------------------------------------

    def publish(
        self,
        previous: RegistrySnapshot,
        current: RegistrySnapshot,
        changed: Collection[str] | None = None,
    ) -> None:
        """Record the changes from ``previous`` to ``current``. Synchronous; never waits.
        ``changed``: the ids the batch touched, when known (see ``actors.core.events.diff``)."""
        self._snapshot = current
        changes = diff(previous, current, changed)
        if not changes:
            return
        ring, size, seq = self._ring, self._history, self._seq
        for change in changes:
            seq += 1
            ring[seq % size] = change
        self._seq = seq
        if self._subscribers:
            late = [s for s in self._subscribers if seq - s.cursor > s.limit]
            for subscriber in late:
                self._drop(subscriber)
        self._wake()

    def close(self) -> None:
        """The gateway is stopping: every watch ends (its iteration stops)."""
        self._closed = True
        self._wake()

    # ---- reads -----------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The last sequence number given out (the head)."""
        return self._seq

    @property
    def snapshot(self) -> RegistrySnapshot:
        """The snapshot as of ``seq``."""
        return self._snapshot

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def resumable(self, since: int) -> bool:
        """Whether the changes after ``since`` are all still in the history."""
        oldest = max(self._start, self._seq - self._history)  # the oldest usable cursor
        return oldest <= since <= self._seq

    @asynccontextmanager
    async def watch(
        self,
        *,
        model: str | None = None,
        worker_type: WorkerType | str | None = None,
        since: int | None = None,
    ) -> AsyncIterator[Watch]:
        """Follow the registry (see the module docstring). Leaving the block unsubscribes."""
        kind = check_filters(model, worker_type, since)
        resume = since is not None and self.resumable(since)
        cursor = since if resume and since is not None else self._seq
        # a resumed watcher may lag by its backlog on top of its buffer (the ring permitting)
        limit = min(self._history, self.subscriber_buffer + (self._seq - cursor))
        subscriber = _Subscriber(cursor, limit)
        self._subscribers.add(subscriber)
        try:
            yield Watch(self, subscriber, model, kind, full=not resume, reset=since is not None)
        finally:
            self._subscribers.discard(subscriber)

    # ---- internals ---------------------------------------------------------------------------

    def _drop(self, subscriber: _Subscriber) -> None:
        subscriber.dropped = True
        self._subscribers.discard(subscriber)
        for callback in subscriber.on_drop:
            callback()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def _changed(self) -> None:
        if self._wakeup is None:
            self._wakeup = trio.Event()
        await self._wakeup.wait()


class Watch:
    """An async iterator of ``WatchEvent``s (not an async generator: a read cancelled by a
    timeout, e.g. the SSE heartbeat, loses nothing)."""

    def __init__(
        self,
        feed: Feed,
        subscriber: _Subscriber,
        model: str | None,
        worker_type: WorkerType | None,
        *,
        full: bool,
        reset: bool,
    ) -> None:
        self._feed = feed
        self._subscriber = subscriber
        self._model = model
        self._worker_type = worker_type
        self._sync_seq = feed.seq  # ``synced`` comes once the cursor reaches this
        self._synced = False
        self._prelude: Iterator[WatchEvent] | None = (
            self._full_state(feed.snapshot, reset) if full else None
        )

    @property
    def last_seq(self) -> int:
        """The last sequence number consumed (what to resume from)."""
        return self._subscriber.cursor

    @property
    def dropped(self) -> bool:
        return self._subscriber.dropped

    def on_drop(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (synchronously, from the publisher) if this watch is dropped."""
        self._subscriber.on_drop.append(callback)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            event = self.next_nowait()
            if event is not None:
                return event
            if self._feed._closed:
                raise StopAsyncIteration
            await self._feed._changed()

    def next_nowait(self) -> WatchEvent | None:
        """The next event if one is ready, else None (never waits). Raises WatchOverflow."""
        subscriber, feed = self._subscriber, self._feed
        if subscriber.dropped:
            raise WatchOverflow(subscriber.cursor, subscriber.limit)
        if self._prelude is not None:
            event = next(self._prelude, None)
            if event is not None:
                return event
            self._prelude = None
        if not self._synced and subscriber.cursor >= self._sync_seq:
            self._synced = True
            return WatchEvent(EventKind.SYNCED, self._sync_seq)
        ring, size, head = feed._ring, feed._history, feed._seq
        while subscriber.cursor < head:
            subscriber.cursor += 1
            change = ring[subscriber.cursor % size]
            assert change is not None  # the cursor never lags past the ring (its limit)
            if self._wanted(change.worker) or (
                change.before is not None and self._wanted(change.before)
            ):
                return WatchEvent(change.kind, subscriber.cursor, change.worker)
        return None

    def _full_state(self, snapshot: RegistrySnapshot, reset: bool) -> Iterator[WatchEvent]:
        seq = self._sync_seq
        if reset:
            yield WatchEvent(EventKind.RESET, seq)
        for worker in snapshot.workers.values():
            if self._wanted(worker):
                yield WatchEvent(status_kind(worker), seq, worker, initial=True)

    def _wanted(self, worker: Worker) -> bool:
        return matches(worker, self._model, self._worker_type)


def check_filters(
    model: str | None, worker_type: WorkerType | str | None, since: int | None = None
) -> WorkerType | None:
    """Validate a watch's arguments (InvalidInput naming the field); the worker type."""
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidInput("model", "must be a non-empty string")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
        raise InvalidInput("since", "must be an integer sequence number")
    if worker_type is None:
        return None
    try:
        return WorkerType(worker_type)
    except ValueError:
        allowed = ", ".join(member.value for member in WorkerType)
        message = f"must be one of {allowed}, not {str(worker_type)[:80]!r}"
        raise InvalidInput("worker_type", message) from None
