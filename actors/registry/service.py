"""The Gateway handle and open_gateway(): every actor is started here and dies with it.

The handle is what the HTTP layer and an embedding trio application hold. Its writes are asks
to the registry; its reads come from the latest published snapshot and never queue.

Its public surface: the worker operations (``add_worker`` ... ``remove_worker``), the reads
(``get_worker``, ``list_workers``, ``snapshot``), the waits (``wait_status``, ``wait_removed``,
``wait_changed``), and for the HTTP layer ``config``, ``metrics`` (the Prometheus registry),
``inflight`` (per-worker counts of proxied requests: read ``count``, ``counts``, wait with
``wait_idle``; only the data plane acquires and releases) and ``forward`` (proxy one inference
request). Everything else is internal, the constructor included: ``open_gateway()`` is the only
way to build a Gateway, as its actors must run in a nursery that dies with it.

**Start-up with a store** (``open_gateway``): the store is opened in its writer thread (a
refused file raises ``StoreError`` before anything starts), loaded, and the table rebuilt from
it (``codec.restore_workers``: same ids, specs, spec versions and labels; the id source
continues past the stored high-water mark); what the recovery changed (restarted jobs, draining
workers dropped, a new id prefix) is committed as the first batch; only then do the actors
start. Ready workers are in the first published snapshot, so they serve at once, and each gets
a health probe at once; failed workers get their recheck scheduled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import httpx
import trio

from actors.core.codec import restore_workers
from actors.core.commands import (
    Ask,
    BeginDrain,
    CreateWorker,
    FinishDrain,
    ReplaceSpec,
    RetryWorker,
    Sync,
    TakeOverJob,
    UpdateSpec,
)
from actors.core.config import GatewayConfig
from actors.core.errors import (
    GatewayStopped,
    RegistryBusy,
    RegistryError,
    RegistryTimeout,
    WorkerFailed,
    WorkerNotFound,
)
from actors.core.jobs import UuidSource
from actors.core.model import Worker, WorkerId, WorkerPatch, WorkerSpec, WorkerStatus, WorkerType
from actors.core.snapshot import RegistrySnapshot
from actors.core.table import WorkerTable
from actors.core.validation import require_instance, require_worker_id
from actors.dataplane import client
from actors.dataplane.breaker import BreakerConfig, CircuitBreakers
from actors.dataplane.inflight import InFlight
from actors.dataplane.metrics import GatewayMetrics
from actors.dataplane.proxy import DataPlane, ProxyRequest, Refusal, Responder
from actors.dataplane.routing import Router
from actors.dataplane.upstream.pool import UpstreamLimits, UpstreamPool
from actors.registry.detection import Detector, Probe
from actors.registry.drain import Drainer
from actors.registry.feed import Feed, Watch
from actors.registry.health import run_health_checker
from actors.registry.mailbox import Envelope, Outbox, deliver, post
from actors.registry.registrar import run_registrar
from actors.registry.registry import Job, Journal, StoreUnavailable, run_registry
from actors.registry.replicas import (
    Duties,
    TakeOverLater,
    run_change_follower,
    run_replica_duties,
)
from actors.store import MemoryStore, Store, open_store
from actors.store.base import Change, StoredState, StoreError, is_shared
from actors.store.writer import StoreWriter, open_store_writer

T = TypeVar("T")
StoreOption = Store | Callable[[], Store] | None
log = logging.getLogger("tmg.gateway")
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


@asynccontextmanager
async def open_gateway(
    config: GatewayConfig | None = None,
    *,
    http_transport: httpx.AsyncBaseTransport | None = None,
    detector: Probe | None = None,
    clock: Callable[[], float] = time.time,
    store: StoreOption = None,
) -> AsyncIterator[Gateway]:
    """Start the registry and the registration workflows; stop them all on exit.

    ``http_transport`` replaces the network for detection (tests use ``httpx.MockTransport``);
    ``detector`` replaces detection altogether (anything with ``async detect(spec)``).
    ``store``: where the registry is kept, a ``Store`` (``actors.store``: ``SqliteStore(path)``,
    or your own) or a function that opens one (called in the writer thread); the gateway closes
    it on exit. Without it, ``config.state`` names it (``:memory:`` or a SQLite file's path).
    A store that cannot be used raises ``actors.store.StoreError`` (``StoreInUse``: another
    gateway holds the file) before anything starts.
    """
    config = config or GatewayConfig()
    async with (
        open_store_writer(_store_opener(config, store)) as writer,
        _open_gateway(config, writer, http_transport, detector, clock) as gateway,
    ):
        yield gateway


def _store_opener(config: GatewayConfig, store: StoreOption) -> Callable[[], Store]:
    if store is None:
        return partial(
            open_store,
            config.state,
            replica=config.instance_id,
            replica_lease_secs=config.replica_lease_secs,
            **({"shared": True} if config.shared_state else {}),
        )
    if callable(getattr(store, "commit", None)):  # a Store itself
        given: Store = store  # type: ignore[assignment]
        return lambda: given
    return store  # type: ignore[return-value]


def _recover(
    config: GatewayConfig,
    writer: StoreWriter,
    stored: StoredState,
    ids: UuidSource,
    clock: Callable[[], float],
) -> tuple[WorkerTable, Journal]:
    """The table rebuilt from the store. A single gateway's store is recovered
    (``codec.restore_workers``: work in progress restarts, draining workers are dropped); a
    shared store's workers are taken in as they are, since other replicas may be working on
    them."""
    options: dict[str, Any] = {
        "new_id": ids,
        "queue_size": config.registration_queue_size,
        "first_job_id": stored.next_job_id,
    }
    if not is_shared(writer.store):
        table = restore_workers(stored.workers.values(), now=clock(), **options)
        return table, Journal(writer, table, ids, stored)
    table = WorkerTable(**options)
    journal = Journal(writer, table, ids, stored)
    everything = Change(
        seq=stored.change_seq,
        upserts=stored.workers,
        id_high_water=stored.id_high_water,
        next_job_id=stored.next_job_id,
        full=True,
    )
    journal.absorb([everything])
    return table, journal


@asynccontextmanager
async def _open_gateway(
    config: GatewayConfig,
    writer: StoreWriter,
    http_transport: httpx.AsyncBaseTransport | None,
    detector: Probe | None,
    clock: Callable[[], float],
) -> AsyncIterator[Gateway]:
    if isinstance(writer.store, MemoryStore):
        log.info("registry in memory only: workers are forgotten when the gateway stops")
    shared = is_shared(writer.store)
    if shared:
        await writer.call(writer.store.join)  # type: ignore[attr-defined]
    stored = await writer.load()
    ids = UuidSource(stored.id_prefix, stored.id_high_water)
    table, journal = _recover(config, writer, stored, ids, clock)
    if not shared:
        await journal.commit(table.take_changes())  # what the recovery changed, first
    ready = [w.id for w in table.workers.values() if w.status is WorkerStatus.READY]
    rechecks = [
        (worker.id, worker.job.job_id, worker.spec.recheck_interval_secs)
        for worker in table.workers.values()
        if worker.status is WorkerStatus.FAILED
        and worker.job is not None
        and not worker.job.active
        and worker.spec.recheck_interval_secs
        and not shared
    ]
    if stored.workers:
        log.info(
            "registry: %d workers recovered (%d ready), %d dropped while draining",
            len(table),
            len(ready),
            len(stored.workers) - len(table),
        )
    client = httpx.AsyncClient(
        transport=http_transport,
        trust_env=False,
        timeout=httpx.Timeout(None),  # every probe is bounded by the caller's cancel scope
        limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=5.0),
    )
    limits = UpstreamLimits(
        connect_timeout=config.upstream_connect_timeout_secs,
        read_timeout=config.upstream_read_timeout_secs,
    )
    async with client, UpstreamPool(limits) as pool, trio.open_nursery() as nursery:
        inbox_send, inbox_receive = trio.open_memory_channel[Envelope[Any]](config.inbox_size)
        jobs_send, jobs_receive = trio.open_memory_channel[Job](config.registration_queue_size)
        inflight = InFlight()
        gateway = Gateway(config, inbox_send, inflight, pool)
        gateway.shared = shared
        duties = Duties()

        async def finish_drain(worker_id: WorkerId) -> Worker:
            refusals = 0
            while True:
                try:
                    return await gateway._ask(FinishDrain(worker_id=worker_id))
                except StoreUnavailable:  # not stored, so not made: ask again
                    refusals += 1
                    await trio.sleep(config.backoff(refusals))

        async def record_idle(worker_id: WorkerId) -> bool:
            try:
                idle: bool = await writer.call(partial(writer.store.record_idle, worker_id))  # type: ignore[attr-defined]
            except StoreError as error:
                log.warning("drain of %s: %s", worker_id, error)
                return False
            return idle

        drainer = Drainer(
            nursery,
            inflight,
            finish_drain,
            record_idle if shared else None,
            idle_poll_secs=config.replica_lease_secs / 5,
        )
        await nursery.start(
            partial(
                run_registry,
                inbox_receive,
                jobs_send,
                gateway._publish,
                table=table,
                drains=drainer,
                # a memory store keeps nothing: no rows to build for it (they cost a fifth of
                # the registry's time in bench_registry)
                journal=None if type(writer.store) is MemoryStore else journal,
                on_removed=gateway._dataplane.forget,
                clock=clock,
            )
        )
        if shared:

            def sync() -> None:
                with contextlib.suppress(GatewayStopped):
                    post(inbox_send, Sync())

            await nursery.start(partial(run_change_follower, writer.store, sync))

            async def take_over(worker_id: WorkerId, job_id: int) -> bool:
                try:
                    await gateway._ask(TakeOverJob(worker_id=worker_id, job_id=job_id))
                except (RegistryBusy, StoreUnavailable, RegistryTimeout, GatewayStopped):
                    raise TakeOverLater() from None
                except RegistryError as error:  # over, or the worker is gone
                    log.info("job %d of worker %s is not taken over: %s", job_id, worker_id, error)
                    return False
                return True

            await nursery.start(
                partial(
                    run_replica_duties,
                    writer,
                    writer.store,
                    duties,
                    take_over,
                    interval_secs=config.replica_lease_secs / 5,
                )
            )
        probe = detector or Detector(client, instance_id=config.instance_id)
        record = gateway.metrics.registration_jobs_outcome
        await nursery.start(
            partial(
                run_registrar,
                jobs_receive,
                inbox_send,
                probe,
                config=config,
                record=record,
                rechecks=rechecks,
            )
        )
        await nursery.start(
            partial(
                run_health_checker,
                inbox_send,
                probe,
                lambda: gateway.snapshot,
                gateway.wait_changed,
                probe_now=ready,
                leading=(lambda: duties.health) if shared else (lambda: True),
            )
        )
        try:
            yield gateway
        finally:
            gateway.feed.close()  # every watch and SSE stream ends cleanly
            nursery.cancel_scope.cancel()
