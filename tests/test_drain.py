"""The drain workflow (actors/registry/drain.py): an idle worker goes at once, a busy one when its
last request ends or at its drain timeout, after the settle time; a second DELETE, or a drain
whose worker is gone already, changes nothing. On trio's virtual clock: no test waits in real
time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from actors import WorkerNotFound, WorkerStatus, open_gateway, worker_spec
from actors.core.errors import StaleJob
from actors.core.model import Worker, WorkerId
from actors.dataplane.inflight import InFlight
from actors.registry.drain import Drainer
from actors.registry.service import Gateway
from tests.conftest import FAST

MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "sglang"}]}


def sglang(request: httpx.Request) -> httpx.Response:
    routes = {"/health": (200, None), "/v1/models": (200, MODELS)}
    status, body = routes.get(request.url.path, (404, {"error": "no"}))
    return httpx.Response(status, json=body)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    """A gateway whose detection is mocked; each test using it asks for ``autojump_clock`` too
    (pytest-trio takes the clock from the test's own arguments)."""
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        yield gateway


async def ready_worker(gateway: Gateway, **fields: object) -> Worker:
    worker = await gateway.add_worker(worker_spec("10.0.0.1:8000", **fields))
    return await gateway.wait_status(worker.id, "ready", 5)


# ---- through the gateway ---------------------------------------------------------------------


async def test_an_idle_ready_worker_is_removed_before_its_delete_returns(
    autojump_clock: trio.testing.MockClock, gateway: Gateway
) -> None:
    worker = await ready_worker(gateway)
    start = trio.current_time()
    removed = await gateway.remove_worker(worker.id)
    assert removed.status is WorkerStatus.DRAINING  # the record it had when it went
    assert gateway.snapshot.get(worker.id) is None
    assert trio.current_time() == start
    await gateway.add_worker(worker_spec("10.0.0.1:8000"))  # the address is free again


async def test_a_busy_worker_is_removed_the_moment_its_last_request_ends(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
) -> None:
    worker = await ready_worker(gateway)
    gateway.inflight.acquire(worker.id)
    gateway.inflight.acquire(worker.id)
    await gateway.remove_worker(worker.id)
    assert "m" not in gateway.snapshot.by_model  # no new request is routed to it
    await trio.sleep(20)  # within the 30 s drain timeout
    gateway.inflight.release(worker.id)
    await trio.testing.wait_all_tasks_blocked()
    assert gateway.get_worker(worker.id).status is WorkerStatus.DRAINING  # one still runs
    released = trio.current_time()
    gateway.inflight.release(worker.id)
    await gateway.wait_removed(worker.id, 60)
    assert trio.current_time() == released


async def test_a_drain_ends_at_the_drain_timeout_with_requests_still_in_flight(
    autojump_clock: trio.testing.MockClock, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    worker = await ready_worker(gateway, drain_timeout_secs=7.0)
    gateway.inflight.acquire(worker.id)
    start = trio.current_time()
    await gateway.remove_worker(worker.id)
    await gateway.wait_removed(worker.id, 60)
    assert trio.current_time() - start == pytest.approx(7.0)
    assert "drain timed out waiting for requests in flight" in caplog.text


async def test_the_settle_time_is_waited_after_the_last_request_ends(
    autojump_clock: trio.testing.MockClock, gateway: Gateway
) -> None:
    worker = await ready_worker(gateway, health={"drain_settle_secs": 3.0})
    gateway.inflight.acquire(worker.id)
    await gateway.remove_worker(worker.id)
    await trio.sleep(2)
    released = trio.current_time()
    gateway.inflight.release(worker.id)
    await gateway.wait_removed(worker.id, 60)
    assert trio.current_time() - released == pytest.approx(3.0)


async def test_an_idle_worker_with_a_settle_time_waits_it_out_before_it_goes(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
) -> None:
    worker = await ready_worker(gateway, health={"drain_settle_secs": 3.0})
    start = trio.current_time()
    removed = await gateway.remove_worker(worker.id)
    assert gateway.get_worker(worker.id).status is WorkerStatus.DRAINING
    assert removed.status is WorkerStatus.DRAINING
    await gateway.wait_removed(worker.id, 60)
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_deletes_racing_a_drain_start_no_second_drain_and_then_find_nothing(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
) -> None:
    worker = await ready_worker(gateway, drain_timeout_secs=10.0)
    gateway.inflight.acquire(worker.id)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # three DELETEs at once: all are accepted, one drain runs
            nursery.start_soon(gateway.remove_worker, worker.id)
    await trio.sleep(5)
    assert (await gateway.remove_worker(worker.id)).status is WorkerStatus.DRAINING
    await gateway.wait_removed(worker.id, 60)
    assert trio.current_time() - start == pytest.approx(10.0)  # the first drain's timeout
    with pytest.raises(WorkerNotFound):
        await gateway.remove_worker(worker.id)
    gateway.inflight.release(worker.id)  # the late request ends: nothing left to drain


async def test_a_delete_whose_caller_gives_up_still_drains_the_worker(
    autojump_clock: trio.testing.MockClock, gateway: Gateway
) -> None:
    worker = await ready_worker(gateway)
    gateway.inflight.acquire(worker.id)
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled while it waits for the registry's answer
        await gateway.remove_worker(worker.id)
    await trio.testing.wait_all_tasks_blocked()
    assert gateway.get_worker(worker.id).status is WorkerStatus.DRAINING
    gateway.inflight.release(worker.id)
    await gateway.wait_removed(worker.id, 60)


# ---- the Drainer alone -----------------------------------------------------------------------


def draining(worker_id: WorkerId = "w1", *, settle_secs: float = 0.0) -> Worker:
    health = {"drain_settle_secs": settle_secs}
    spec = worker_spec("10.0.0.1:8000", drain_timeout_secs=30.0, health=health)
    return Worker(
        id=worker_id, spec=spec, status=WorkerStatus.DRAINING, created_at=0.0, updated_at=0.0
    )


async def test_a_drainer_asks_to_finish_once_per_worker_and_forgets_it_after(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    inflight = InFlight()
    finished: list[tuple[WorkerId, float]] = []

    async def finish(worker_id: WorkerId) -> None:
        finished.append((worker_id, trio.current_time()))

    drainer = Drainer(nursery, inflight, finish)
    worker = draining()
    assert drainer.removable_now(worker)
    inflight.acquire(worker.id)
    assert not drainer.removable_now(worker)
    drainer.start(worker)
    drainer.start(worker)  # a second DELETE
    assert drainer.draining == {worker.id}
    await trio.sleep(1)
    inflight.release(worker.id)
    await trio.testing.wait_all_tasks_blocked()
    assert finished == [(worker.id, 1.0)]
    assert drainer.draining == frozenset()
    assert not drainer.removable_now(draining(settle_secs=0.5))


async def test_a_finish_the_registry_refuses_is_not_an_error(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def finish(worker_id: WorkerId) -> None:
        raise StaleJob(worker_id, "worker is ready, not draining")

    caplog.set_level(logging.DEBUG, logger="tmg.drain")
    drainer = Drainer(nursery, InFlight(), finish)
    drainer.start(draining())
    await trio.testing.wait_all_tasks_blocked()
    assert drainer.draining == frozenset()
    assert "finish drain of w1" in caplog.text


async def test_a_replicas_drain_waits_for_the_others_and_ends_when_the_worker_is_gone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    polls: list[float] = []
    finished: list[WorkerId] = []

    async def others_busy(worker_id: WorkerId) -> bool:
        polls.append(trio.current_time())
        return False  # another replica still has requests in flight

    async def finish(worker_id: WorkerId) -> None:
        finished.append(worker_id)

    drainer = Drainer(nursery, InFlight(), finish, others_busy, idle_poll_secs=0.1)
    worker = draining()
    assert not drainer.removable_now(worker)  # never in the DELETE's own step
    drainer.start(worker)
    await trio.sleep(1)
    assert len(polls) > 5 and drainer.draining == {worker.id}
    drainer.forget(worker.id)  # removed through another replica
    await trio.testing.wait_all_tasks_blocked()
    count = len(polls)
    await trio.sleep(60)
    assert len(polls) == count  # no polling after it was gone
    assert finished == [] and drainer.draining == frozenset()
