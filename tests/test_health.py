"""Active health checks: thresholds flip is_healthy through the registry, on virtual time."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from actors import HealthConfig, open_gateway, worker_spec
from actors.registry.service import Gateway
from tests.conftest import FAST, StartWorkers, wait_until

MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "sglang"}]}


class FlakyWorker:
    """A mocked worker whose /health answer the test flips; it counts health probes."""

    def __init__(self) -> None:
        self.healthy = True
        self.probes = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            self.probes += 1
            return httpx.Response(200 if self.healthy else 503)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return httpx.Response(404)


def healthy(gateway: Gateway, worker_id: str) -> bool:
    return gateway.get_worker(worker_id).is_healthy


async def test_failures_and_successes_flip_health_at_their_thresholds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FlakyWorker()
    health = HealthConfig(check_interval_secs=10, failure_threshold=3, success_threshold=2)
    async with open_gateway(FAST, http_transport=httpx.MockTransport(fake)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000", health=health))
        await gateway.wait_status(worker.id, "ready", 5)
        fake.healthy = False
        start = trio.current_time()
        await wait_until(gateway, lambda: not healthy(gateway, worker.id))
        assert 30 <= trio.current_time() - start < 31  # the third failed probe, 10 s apart
        assert gateway.snapshot.by_model["m"] == (worker.id,)  # still ready: only unhealthy
        assert not gateway.get_worker(worker.id).is_routable
        fake.healthy = True
        start = trio.current_time()
        await wait_until(gateway, lambda: healthy(gateway, worker.id))
        assert 10 <= trio.current_time() - start < 21  # two good probes


async def test_a_worker_with_health_checks_disabled_is_never_probed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FlakyWorker()
    health = HealthConfig(check_interval_secs=1, disable=True)
    async with open_gateway(FAST, http_transport=httpx.MockTransport(fake)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000", health=health))
        await gateway.wait_status(worker.id, "ready", 5)
        probes = fake.probes  # the registration's own GET /health
        await trio.sleep(60)
        assert fake.probes == probes
        assert healthy(gateway, worker.id)


async def test_probing_stops_when_the_worker_is_removed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FlakyWorker()
    health = HealthConfig(check_interval_secs=1)
    async with open_gateway(FAST, http_transport=httpx.MockTransport(fake)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.1:8000", health=health))
        await gateway.wait_status(worker.id, "ready", 5)
        await trio.sleep(5.5)
        assert fake.probes >= 5
        await gateway.remove_worker(worker.id)
        probes = fake.probes
        await trio.sleep(60)
        assert fake.probes == probes


async def test_a_real_worker_whose_health_fails_becomes_unhealthy_and_readiness_follows(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    body = {
        "url": f"127.0.0.1:{worker.port}",
        "health": {"check_interval_secs": 0.1, "failure_threshold": 2, "success_threshold": 1},
    }
    with trio.fail_after(10):
        worker_id = (await client.post("/workers", json=body)).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        assert (await client.get("/readiness")).status_code == 200
        worker.config.fail_health = True
        await wait_until(gateway, lambda: not healthy(gateway, worker_id))
        info = (await client.get(f"/workers/{worker_id}")).json()
        readiness = await client.get("/readiness")
        worker.config.fail_health = False
        await wait_until(gateway, lambda: healthy(gateway, worker_id))
    assert (info["status"], info["is_healthy"]) == ("ready", False)
    assert readiness.status_code == 503
