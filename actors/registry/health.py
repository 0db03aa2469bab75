"""run_health_checker(): active health checks of ready workers.

A supervisor follows the published snapshots (at most every ``COALESCE_SECS``, so a burst of
registrations costs one pass) and keeps one probing task per READY worker whose
``health.disable`` is false (restarted when its health settings change, stopped when the worker
leaves READY). Each task probes every ``check_interval_secs`` (HTTP ``GET /health``, or the HTTP/2
preface for a gRPC worker), counts consecutive results, and when ``failure_threshold`` failures
or ``success_threshold`` successes flip the worker's health, asks the registry (``SetHealth``):
the result goes through the registry actor like every other mutation.

After a restart, the workers recovered ``ready`` (``probe_now``) serve at once on their stored
health and are probed at once, not after an interval, and that first probe decides alone (a
threshold of one): a worker that went away while the gateway was down leaves routing within
one probe timeout. A flip the registry could not store (``StoreUnavailable``) is not taken:
the streak starts again and the next probes ask again.

With replicas (a shared store), only the holder of the ``health`` lease probes (``leading``);
the others follow the results through the change feed, and take over within a lease when the
holder stops.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import trio

from actors.core.commands import SetHealth
from actors.core.errors import GatewayStopped, RegistryError
from actors.core.model import HealthConfig, Worker, WorkerId, WorkerStatus
from actors.core.snapshot import RegistrySnapshot
from actors.registry.detection import Probe
from actors.registry.mailbox import Outbox, ask
from actors.registry.registry import StoreUnavailable

log = logging.getLogger("tmg.health")
COALESCE_SECS = 0.05  # a worker is looked at once it has been ready this long (probes come later)


@dataclass(slots=True)
class _Probing:
    health: HealthConfig
    scope: trio.CancelScope


async def run_health_checker(
    registry: Outbox,
    prober: Probe,
    current: Callable[[], RegistrySnapshot],
    changed: Callable[[], Awaitable[None]],
    *,
    probe_now: Collection[WorkerId] = (),
    leading: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    probing: dict[WorkerId, _Probing] = {}
    at_once = set(probe_now)  # recovered ready workers: probed without waiting an interval
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            snapshot = current()
            wanted = {
                worker.id: worker
                for worker in snapshot.workers.values()
                if worker.status is WorkerStatus.READY and not worker.spec.health.disable
            }
            for worker_id in list(probing):
                entry = probing[worker_id]
                worker = wanted.get(worker_id)
                if worker is None or worker.spec.health != entry.health:
                    entry.scope.cancel()
                    del probing[worker_id]
            for worker_id, worker in wanted.items():
                if worker_id not in probing:
                    scope = trio.CancelScope()
                    probing[worker_id] = _Probing(worker.spec.health, scope)
                    first = worker_id in at_once
                    at_once.discard(worker_id)
                    nursery.start_soon(
                        _probe_forever, registry, prober, current, leading, worker, scope, first
                    )
            await changed()
            await trio.sleep(COALESCE_SECS)  # under churn, one pass covers many changes


async def _probe_forever(
    registry: Outbox,
    prober: Probe,
    current: Callable[[], RegistrySnapshot],
    leading: Callable[[], bool],
    worker: Worker,
    scope: trio.CancelScope,
    at_once: bool = False,
) -> None:
    health = worker.spec.health
    healthy = worker.is_healthy
    streak = 0  # consecutive results that disagree with ``healthy``
    with scope:
        while True:
            if not at_once:
                await trio.sleep(health.check_interval_secs)
            latest = current().get(worker.id)
            if latest is None:
                return
            if latest.is_healthy != healthy:  # another replica's probes flipped it
                healthy, streak = latest.is_healthy, 0
            if not leading():  # another replica holds the health lease: it probes
                at_once = False
                continue
            reason: str | None = f"no answer within {health.timeout_secs:g} s"
            with trio.move_on_after(health.timeout_secs):
                reason = await prober.check_health(latest.spec, latest.url)
            ok = reason is None
            streak = 0 if ok == healthy else streak + 1
            needed = health.success_threshold if not healthy else health.failure_threshold
            if at_once:  # the first probe after a restart decides alone
                at_once, needed = False, 1
            if streak < needed:
                continue
            healthy, streak = ok, 0
            if ok:
                log.info("worker %s is healthy again", worker.id)
            else:
                log.warning("worker %s is unhealthy: %s", worker.id, reason)
            try:
                await ask(registry, SetHealth(worker_id=worker.id, healthy=healthy))
            except StoreUnavailable:
                healthy = not healthy  # not recorded: count again from the next probe
                log.warning("worker %s: its health could not be stored", worker.id)
            except (RegistryError, GatewayStopped):
                return  # removed or no longer ready: the supervisor stops this task anyway
