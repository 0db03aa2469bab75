"""The Gateway handle: what the HTTP layer and an embedding trio application hold. Its writes
are asks to the registry; its reads come from the latest published snapshot and never queue.

Its public surface: the worker operations (``add_worker`` ... ``remove_worker``), the reads
(``get_worker``, ``list_workers``, ``snapshot``), the waits (``wait_status``, ``wait_removed``,
``wait_changed``), and for the HTTP layer ``config``, ``metrics`` (the Prometheus registry),
``inflight`` (per-worker counts of proxied requests: read ``count``, ``counts``, wait with
``wait_idle``; only the data plane acquires and releases) and ``forward`` (proxy one inference
request). Everything else is internal, the constructor included: ``open_gateway()``
(``actors/registry/startup.py``) is the only way to build a Gateway, as its actors must run in a
nursery that dies with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import trio

from actors.core.commands import (
    Ask,
    BeginDrain,
    CreateWorker,
    ReplaceSpec,
    RetryWorker,
    Sync,
    UpdateSpec,
)
from actors.core.config import GatewayConfig
from actors.core.errors import (
    RegistryTimeout,
    WorkerFailed,
    WorkerNotFound,
)
from actors.core.model import Worker, WorkerId, WorkerPatch, WorkerSpec, WorkerStatus, WorkerType
from actors.core.snapshot import RegistrySnapshot
from actors.core.validation import require_instance, require_worker_id
from actors.dataplane import client
from actors.dataplane.breaker import BreakerConfig, CircuitBreakers
from actors.dataplane.inflight import InFlight
from actors.dataplane.metrics import GatewayMetrics
from actors.dataplane.proxy import DataPlane, ProxyRequest, Refusal, Responder
from actors.dataplane.routing import Router
from actors.dataplane.upstream.pool import UpstreamPool
from actors.registry.feed import Feed, Watch
from actors.registry.mailbox import Outbox, deliver, post
from actors.store import Store

T = TypeVar("T")
StoreOption = Store | Callable[[], Store] | None
REPLICA_DELETE_WAIT_SECS = 1.0  # a DELETE's wait for the other replicas' drains (see there)
Forward = Callable[[ProxyRequest, Responder], Awaitable[Refusal | None]]


class Gateway:
    """The gateway as a library. Build it with ``open_gateway()`` (the constructor is internal).

    ``config`` is what it runs with; ``metrics`` renders ``GET /metrics``; ``inflight`` holds the
    per-worker counts of proxied requests (``count``, ``counts``, ``wait_idle``);
    ``forward(request, responder)`` proxies one inference request to a worker and returns None
    once an answer went out, else the ``Refusal`` to answer with (``actors/dataplane/proxy.py``).
    """

    def __init__(
        self,
        config: GatewayConfig,
        registry: Outbox,
        inflight: InFlight,
        pool: UpstreamPool,
    ) -> None:
        self.config = config
        self.shared = False  # True with a store other replicas share (set by open_gateway)
        self._inflight = inflight
        self._registry = registry
        self._snapshot = RegistrySnapshot()
        self.feed = Feed(self._snapshot)  # change events, fed by _publish
        self._changed: trio.Event | None = None  # created when someone waits
        self._watchers: dict[WorkerId, trio.Event] = {}  # per-worker waits (wait_status)
        self.metrics = GatewayMetrics(config.process_label)
        breakers = CircuitBreakers(
            BreakerConfig(
                failure_threshold=config.breaker_failures,
                cooldown_secs=config.breaker_cooldown_secs,
            )
        )
        self._dataplane = DataPlane(
            lambda: self._snapshot,
            inflight,
            pool,
            Router(config.policy),
            breakers,
            self.metrics,
            retries=config.retries,
        )
        self.metrics.watch(
            lambda: self._snapshot,
            inflight.counts,
            breakers.states,
            lambda: int(registry.statistics().current_buffer_used),
        )
        # the data plane's own method: no extra call on the hot path
        self.forward: Forward = self._dataplane.forward

    @property
    def inflight(self) -> InFlight:
        """Per-worker counts of requests being proxied (``count``, ``counts``, ``wait_idle``)."""
        return self._inflight

    # ---- reads (the latest snapshot; never wait for the registry) -------------------------

    @property
    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    def get_worker(self, worker_id: WorkerId) -> Worker:
        worker = self._snapshot.get(worker_id)
        if worker is None:
            raise WorkerNotFound(worker_id)
        return worker

    def list_workers(
        self,
        *,
        model: str | None = None,
        status: WorkerStatus | str | None = None,
        worker_type: WorkerType | str | None = None,
    ) -> list[Worker]:
        return self._snapshot.select(
            model=model,
            status=None if status is None else WorkerStatus(status),
            worker_type=None if worker_type is None else WorkerType(worker_type),
        )

    # ---- writes (asks to the registry) ------------------------------------------------

    async def add_worker(self, spec: WorkerSpec) -> Worker:
        """Register a worker: it exists (``pending``) under its final id when this returns."""
        self.config.check_address(spec)
        return await self._ask(CreateWorker(spec=self.config.resolve(spec)))

    async def replace_worker(
        self, worker_id: WorkerId, spec: WorkerSpec, *, if_match: int | None = None
    ) -> Worker:
        """PUT: re-detect with ``spec`` while the current spec keeps serving, then swap."""
        require_worker_id(worker_id)
        self.config.check_address(spec)
        message = ReplaceSpec(
            worker_id=worker_id, spec=self.config.resolve(spec), if_match=if_match
        )
        return await self._ask(message)

    async def update_worker(
        self, worker_id: WorkerId, patch: WorkerPatch, *, if_match: int | None = None
    ) -> Worker:
        """PATCH: applied before this returns."""
        require_worker_id(worker_id)
        require_instance("patch", patch, WorkerPatch)
        return await self._ask(UpdateSpec(worker_id=worker_id, patch=patch, if_match=if_match))

    async def retry_worker(self, worker_id: WorkerId) -> Worker:
        require_worker_id(worker_id)
        return await self._ask(RetryWorker(worker_id=worker_id))

    async def remove_worker(self, worker_id: WorkerId) -> Worker:
        """DELETE: a pending or failed worker is gone when this returns, and so is an idle
        ready one; a busy ready one drains (no new requests) and is removed once idle or after
        its drain timeout (``actors/registry/drain.py``). With replicas, an idle ready worker
        is removed once every replica has nothing in flight to it: this waits up to
        ``REPLICA_DELETE_WAIT_SECS`` for that, so that in the usual case (idle everywhere) it
        is gone when this returns, as with one gateway."""
        require_worker_id(worker_id)
        worker = await self._ask(BeginDrain(worker_id=worker_id))
        if self.shared and worker.status is WorkerStatus.DRAINING:
            with trio.move_on_after(REPLICA_DELETE_WAIT_SECS):
                while self._snapshot.get(worker_id) is not None:
                    await self._wait_worker_changed(worker_id)
        return worker

    async def sync(self) -> None:
        """With a shared store: return once every change other replicas committed before the
        call is in this gateway's snapshot (at once otherwise)."""
        if self.shared:
            await self._ask(Sync())

    async def find_worker(self, worker_id: WorkerId) -> Worker:
        """``get_worker``, but with a shared store an id this replica does not know yet is
        looked for in the store's newest changes first: an id any replica returned is never
        404 on another."""
        if self.shared and self._snapshot.get(worker_id) is None:
            await self.sync()
        return self.get_worker(worker_id)

    # ---- waiting --------------------------------------------------------------------------

    async def wait_status(
        self,
        worker_id: WorkerId,
        status: WorkerStatus | str,
        timeout: float,  # noqa: ASYNC109 - the library's documented signature
    ) -> Worker:
        """Wait until the worker has ``status``. Raises WorkerNotFound if it is (or gets)
        removed; WorkerFailed if it turns ``failed`` during the wait while another status is
        awaited (one that is failed already may still come back: a retry or recheck);
        trio.TooSlowError after ``timeout`` seconds."""
        wanted = WorkerStatus(status)
        worker = await self.find_worker(worker_id)
        previous = worker.status
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            while True:
                if worker.status is wanted:
                    return worker
                if worker.status is WorkerStatus.FAILED and previous is not WorkerStatus.FAILED:
                    message = worker.job.message if worker.job else None
                    raise WorkerFailed(worker_id, message or "registration failed")
                previous = worker.status
                await self._wait_worker_changed(worker_id)
                worker = self.get_worker(worker_id)
        raise trio.TooSlowError(f"worker {worker_id} is {worker.status}, not {wanted}")

    async def wait_removed(
        self,
        worker_id: WorkerId,
        timeout: float,  # noqa: ASYNC109 - same shape as wait_status
    ) -> None:
        with trio.fail_after(timeout):
            while self._snapshot.get(worker_id) is not None:
                await self._wait_worker_changed(worker_id)

    async def wait_changed(self) -> None:
        """Wait for the next published snapshot."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    async def _wait_worker_changed(self, worker_id: WorkerId) -> None:
        """Wait for a snapshot in which this worker's record differs (or is gone)."""
        event = self._watchers.get(worker_id)
        if event is None:
            event = self._watchers[worker_id] = trio.Event()
        await event.wait()

    # ---- following the registry, and inference as a call ---------------------------------

    def watch(
        self,
        *,
        model: str | None = None,
        worker_type: WorkerType | str | None = None,
        since: int | None = None,
    ) -> AbstractAsyncContextManager[Watch]:
        """``async with gateway.watch() as events: async for event in events``: the current
        state, then ``synced``, then every change in order (``actors/registry/feed.py``)."""
        return self.feed.watch(model=model, worker_type=worker_type, since=since)

    async def request(
        self, path: str, body: Mapping[str, Any] | bytes, *, session_key: str | None = None
    ) -> client.Answer:
        """One inference request through the gateway's routing; the whole answer."""
        return await client.request(self, path, body, session_key=session_key)

    def stream(
        self, path: str, body: Mapping[str, Any] | bytes, *, session_key: str | None = None
    ) -> AbstractAsyncContextManager[client.EventStream]:
        """A streaming inference request: ``async with gateway.stream(...) as events``."""
        return client.stream(self, path, body, session_key=session_key)

    # ---- internals ------------------------------------------------------------------------

    def _publish(self, snapshot: RegistrySnapshot) -> None:
        previous, self._snapshot = self._snapshot, snapshot
        self.feed.publish(previous, snapshot)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if self._watchers:
            old, new = previous.workers, snapshot.workers
            for worker_id in [w for w in self._watchers if old.get(w) is not new.get(w)]:
                self._watchers.pop(worker_id).set()

    async def _ask(self, message: Ask[T]) -> T:
        """Ask the registry. Waiting for room in a full inbox is bounded by ask_timeout_secs
        (a 503); the answer itself comes at once, as the registry never waits on anyone."""
        reply = post(self._registry, message)
        if reply is None:  # the inbox is full: wait for room, but not forever
            timeout = self.config.ask_timeout_secs
            with trio.move_on_after(timeout):
                reply = await deliver(self._registry, message)
            if reply is None:
                raise RegistryTimeout(f"the registry inbox stayed full for {timeout:g} s")
        return await reply.wait()
