"""The Gateway handle and open_gateway(): every actor is started here and dies with it.

The handle is what the HTTP layer and an embedding trio application hold. Its writes are asks
to the registry; its reads come from the latest published snapshot and never queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import httpx
import trio

from actors.core.commands import (
    Ask,
    BeginDrain,
    CreateWorker,
    FinishDrain,
    ReplaceSpec,
    RetryWorker,
    UpdateSpec,
)
from actors.core.config import GatewayConfig
from actors.core.errors import RegistryError, RegistryTimeout, WorkerFailed, WorkerNotFound
from actors.core.model import Worker, WorkerId, WorkerPatch, WorkerSpec, WorkerStatus, WorkerType
from actors.core.snapshot import RegistrySnapshot
from actors.core.table import WorkerTable
from actors.core.validation import require_instance, require_worker_id
from actors.dataplane.breaker import BreakerConfig, CircuitBreakers
from actors.dataplane.inflight import InFlight
from actors.dataplane.metrics import GatewayMetrics
from actors.dataplane.proxy import DataPlane
from actors.dataplane.routing import Router
from actors.dataplane.upstream.pool import UpstreamLimits, UpstreamPool
from actors.registry.detection import Detector, Probe
from actors.registry.health import run_health_checker
from actors.registry.mailbox import Envelope, Outbox, deliver, post
from actors.registry.registrar import run_registrar
from actors.registry.registry import Job, run_registry

log = logging.getLogger("tmg.gateway")
T = TypeVar("T")


class Gateway:
    """The gateway as a library. Create it with ``open_gateway()``."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Outbox,
        nursery: trio.Nursery,
        inflight: InFlight,
        pool: UpstreamPool,
    ) -> None:
        self.config = config
        self.inflight = inflight
        self._registry = registry
        self._nursery = nursery
        self._snapshot = RegistrySnapshot()
        self._changed: trio.Event | None = None  # created when someone waits
        self._watchers: dict[WorkerId, trio.Event] = {}  # per-worker waits (wait_status)
        self._draining: set[WorkerId] = set()
        self.metrics = GatewayMetrics()
        breakers = CircuitBreakers(
            BreakerConfig(
                failure_threshold=config.breaker_failures,
                cooldown_secs=config.breaker_cooldown_secs,
            )
        )
        self.dataplane = DataPlane(
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

    def _forget(self, worker_id: WorkerId) -> None:
        """A worker left the registry: drop the data plane's state about it."""
        self.dataplane.forget(worker_id)

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
        """DELETE: a pending or failed worker is gone when this returns; a ready one drains
        (no new requests) and is removed once idle or after its drain timeout."""
        require_worker_id(worker_id)
        worker = await self._ask(BeginDrain(worker_id=worker_id))
        # an idle worker is gone already (the registry removed it in the same step)
        if self._snapshot.get(worker_id) is not None and worker_id not in self._draining:
            self._draining.add(worker_id)
            self._nursery.start_soon(self._drain, worker)
        return worker

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
        worker = self.get_worker(worker_id)
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

    # ---- internals ------------------------------------------------------------------------

    def _publish(self, snapshot: RegistrySnapshot) -> None:
        previous, self._snapshot = self._snapshot, snapshot
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

    async def _drain(self, worker: Worker) -> None:
        spec = worker.spec
        try:
            with trio.move_on_after(spec.drain_timeout_secs or 0.0) as waited:
                await self.inflight.wait_idle(worker.id)
            if waited.cancelled_caught:
                log.warning("worker %s: drain timed out with requests in flight", worker.id)
            await trio.sleep(spec.health.drain_settle_secs)
            await self._finish_drain(worker.id)
        finally:
            self._draining.discard(worker.id)

    async def _finish_drain(self, worker_id: WorkerId) -> None:
        try:
            await self._ask(FinishDrain(worker_id=worker_id))
        except RegistryError as error:  # already gone
            log.debug("finish drain of %s: %s", worker_id, error)


@asynccontextmanager
async def open_gateway(
    config: GatewayConfig | None = None,
    *,
    http_transport: httpx.AsyncBaseTransport | None = None,
    detector: Probe | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Gateway]:
    """Start the registry and the registration workflows; stop them all on exit.

    ``http_transport`` replaces the network for detection (tests use ``httpx.MockTransport``);
    ``detector`` replaces detection altogether (anything with ``async detect(spec)``).
    """
    config = config or GatewayConfig()
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
        gateway = Gateway(config, inbox_send, nursery, InFlight(), pool)
        table = WorkerTable(queue_size=config.registration_queue_size)
        await nursery.start(
            partial(
                run_registry,
                inbox_receive,
                jobs_send,
                gateway._publish,
                table=table,
                is_idle=lambda worker_id: gateway.inflight.count(worker_id) == 0,
                on_removed=gateway._forget,
                clock=clock,
            )
        )
        probe = detector or Detector(client, instance_id=config.instance_id)
        record = gateway.metrics.registration_jobs_outcome
        await nursery.start(
            partial(run_registrar, jobs_receive, inbox_send, probe, config=config, record=record)
        )
        await nursery.start(
            run_health_checker, inbox_send, probe, lambda: gateway.snapshot, gateway.wait_changed
        )
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()
