"""The gateway as a library: open_gateway() and its handle, with the network mocked and, where
time matters, trio's autojump clock (virtual time: no test waits in real time)."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from actors import (
    GatewayConfig,
    GatewayStopped,
    WorkerAlreadyExists,
    WorkerFailed,
    WorkerNotFound,
    WorkerPatch,
    WorkerStatus,
    open_gateway,
    worker_spec,
)
from tests.conftest import FAST

MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "sglang"}]}


def sglang(request: httpx.Request) -> httpx.Response:
    routes = {"/health": (200, None), "/v1/models": (200, MODELS)}
    status, body = routes.get(request.url.path, (404, {"error": "no"}))
    return httpx.Response(status, json=body)


def refusing(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


async def test_an_added_worker_is_readable_the_moment_add_worker_returns() -> None:
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000"))
        assert gateway.get_worker(worker.id).status is WorkerStatus.PENDING
        ready = await gateway.wait_status(worker.id, "ready", 5)
        assert ready.url.text == "http://10.0.0.1:8000"
        assert [w.id for w in gateway.list_workers(model="m", status="ready")] == [worker.id]
        with pytest.raises(WorkerAlreadyExists) as taken:
            await gateway.add_worker(worker_spec("HTTP://10.0.0.1:8000/"))
        assert taken.value.worker_id == worker.id


async def test_a_ready_worker_with_requests_in_flight_drains_until_they_finish() -> None:
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000"))
        await gateway.wait_status(worker.id, "ready", 5)
        gateway.inflight.acquire(worker.id)
        removed = await gateway.remove_worker(worker.id)
        assert removed.status is WorkerStatus.DRAINING
        assert "m" not in gateway.snapshot.by_model  # no new requests are routed to it
        await trio.testing.wait_all_tasks_blocked()
        assert gateway.get_worker(worker.id).status is WorkerStatus.DRAINING
        again = await gateway.remove_worker(worker.id)  # a second DELETE is fine
        assert again.status is WorkerStatus.DRAINING
        gateway.inflight.release(worker.id)
        await gateway.wait_removed(worker.id, 5)
        with pytest.raises(WorkerNotFound):
            gateway.get_worker(worker.id)


async def test_a_drain_that_never_goes_idle_ends_at_the_drain_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000", drain_timeout_secs=7.0))
        await gateway.wait_status(worker.id, "ready", 5)
        gateway.inflight.acquire(worker.id)
        start = trio.current_time()
        await gateway.remove_worker(worker.id)
        await gateway.wait_removed(worker.id, 60)
        assert 7.0 <= trio.current_time() - start < 8.0


async def test_registration_gives_up_at_its_timeout_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = GatewayConfig(recheck_interval_secs=0)
    async with open_gateway(config, http_transport=httpx.MockTransport(refusing)) as gateway:
        spec = worker_spec("10.0.0.2:8000", registration_timeout_secs=45.0)
        worker = await gateway.add_worker(spec)
        start = trio.current_time()
        with pytest.raises(WorkerFailed) as failed:
            await gateway.wait_status(worker.id, "ready", 600)
        elapsed = trio.current_time() - start
        job = gateway.get_worker(worker.id).job
    assert 45.0 <= elapsed < 46.0
    assert failed.value.reason.startswith("timed out after 45 s")
    assert "connection refused" in failed.value.reason
    assert job is not None and job.attempts > 3


async def test_attempts_back_off_and_stop_at_max_connection_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = GatewayConfig(backoff_initial_secs=1.0, backoff_max_secs=4.0, recheck_interval_secs=0)
    async with open_gateway(config, http_transport=httpx.MockTransport(refusing)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.2:8000", max_connection_attempts=5))
        start = trio.current_time()
        await gateway.wait_status(worker.id, "failed", 600)
        elapsed = trio.current_time() - start
        job = gateway.get_worker(worker.id).job
    assert job is not None and job.attempts == 5
    assert job.message is not None and job.message.startswith("gave up after 5 attempts")
    assert 1 + 2 + 4 + 4 <= elapsed < 12  # backoff doubled and was capped


async def test_a_failed_worker_comes_back_by_itself_when_it_answers_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answering = False

    def flaky(request: httpx.Request) -> httpx.Response:
        return sglang(request) if answering else refusing(request)

    config = GatewayConfig(recheck_interval_secs=30.0, backoff_initial_secs=0.01)
    async with open_gateway(config, http_transport=httpx.MockTransport(flaky)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.3:8000", max_connection_attempts=1))
        await gateway.wait_status(worker.id, "failed", 5)
        start = trio.current_time()
        answering = True
        ready = await gateway.wait_status(worker.id, "ready", 100)
    assert ready.id == worker.id
    assert 29.0 <= trio.current_time() - start < 31.0


async def test_update_worker_applies_before_it_returns() -> None:
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000", labels={"a": "1"}))
        updated = await gateway.update_worker(worker.id, WorkerPatch(priority=3, labels={"b": "2"}))
        assert updated.spec.priority == 3
        assert gateway.get_worker(worker.id).spec.labels == {"a": "1", "b": "2"}
        assert gateway.get_worker(worker.id).spec_version == 2


async def test_two_gateways_in_one_process_share_nothing() -> None:
    transport = httpx.MockTransport(sglang)
    async with (
        open_gateway(FAST, http_transport=transport) as one,
        open_gateway(FAST, http_transport=transport) as two,
    ):
        first = await one.add_worker(worker_spec("10.0.0.1:8000"))
        second = await two.add_worker(worker_spec("10.0.0.1:8000"))  # no 409: another registry
        assert first.id != second.id
        assert list(one.snapshot.workers) == [first.id]
        assert list(two.snapshot.workers) == [second.id]


async def test_a_stopped_gateway_refuses_asks() -> None:
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        pass
    with pytest.raises(GatewayStopped):
        await gateway.add_worker(worker_spec("10.0.0.1:8000"))
