"""open_gateway(): every actor of a gateway is started here and dies with it.

**Start-up with a store**: the store is opened in its writer thread (a refused file raises
``StoreError`` before anything starts), loaded, and the table rebuilt from it
(``codec.restore_workers``: same ids, specs, spec versions and labels; the id source continues
past the stored high-water mark); what the recovery changed (restarted jobs, draining workers
dropped, a new id prefix) is committed as the first batch; only then do the actors start.
Ready workers are in the first published snapshot, so they serve at once, and each gets a
health probe at once; failed workers get their recheck scheduled. A shared store (replicas) is
taken in as it is instead (``_recover``): other replicas may be working on its workers, and
the replica's own duties start beside the registry (``actors/registry/replicas.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import httpx
import trio

from actors.core.codec import restore_workers
from actors.core.commands import (
    FinishDrain,
    Sync,
    TakeOverJob,
)
from actors.core.config import GatewayConfig
from actors.core.errors import (
    GatewayStopped,
    RegistryBusy,
    RegistryError,
    RegistryTimeout,
)
from actors.core.jobs import UuidSource
from actors.core.model import Worker, WorkerId, WorkerStatus
from actors.core.table import WorkerTable
from actors.dataplane.inflight import InFlight
from actors.dataplane.upstream.pool import UpstreamLimits, UpstreamPool
from actors.registry.detection import Detector, Probe
from actors.registry.drain import Drainer
from actors.registry.health import run_health_checker
from actors.registry.mailbox import Envelope, post
from actors.registry.registrar import run_registrar
from actors.registry.registry import Job, Journal, StoreUnavailable, run_registry
from actors.registry.replicas import (
    Duties,
    TakeOverLater,
    run_change_follower,
    run_replica_duties,
)
from actors.registry.service import Gateway
from actors.store import MemoryStore, Store, open_store
from actors.store.base import Change, StoredState, StoreError, is_shared
from actors.store.writer import StoreWriter, open_store_writer

T = TypeVar("T")
StoreOption = Store | Callable[[], Store] | None
log = logging.getLogger("tmg.gateway")


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
