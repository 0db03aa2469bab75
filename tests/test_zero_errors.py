"""Zero non-2xx under change: clients send requests continuously while a worker is replaced,
removed and re-added, killed and restarted, or starts failing health. Every answer is counted.

Changes are paced by completed requests, not by wall-clock sleeps: "every 50 requests" stands
in for "every 250 ms" and makes each run the same whatever the machine's speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import trio

from actors import HealthConfig
from actors.registry.service import Gateway
from scripts.fake_worker import FakeWorker
from tests.conftest import Open, StartWorkers, register, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
Change = Callable[["Traffic"], Awaitable[None]]


class Traffic:
    """Clients that post chat completions until stopped, counting every answer."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.statuses: Counter[int] = Counter()
        self.workers: Counter[str] = Counter()
        self.done = 0
        self._stopping = False
        self._waiters: list[tuple[int, trio.Event]] = []

    async def run(self, clients: int, change: Change) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(self._client)
            await self.after(20)  # traffic is flowing before anything changes
            await change(self)
            await self.after(20)  # and keeps flowing after
            self._stopping = True  # each client ends after its current request (no cancel)

    async def after(self, requests: int) -> None:
        """Wait until ``requests`` more answers have arrived."""
        event = trio.Event()
        self._waiters.append((self.done + requests, event))
        await event.wait()

    async def _client(self) -> None:
        while not self._stopping:
            answer = await self.client.post("/v1/chat/completions", json=CHAT)
            self.statuses[answer.status_code] += 1
            self.workers[answer.headers.get("x-worker-id", "none")] += 1
            self.done += 1
            for target, event in [w for w in self._waiters if w[0] <= self.done]:
                self._waiters.remove((target, event))
                event.set()


FAST_HEALTH: dict[str, object] = {
    "check_interval_secs": 0.1,  # the minimum
    "failure_threshold": 2,
    "success_threshold": 1,
}
PROBED = HealthConfig(check_interval_secs=0.1, failure_threshold=2, success_threshold=1)


@dataclass
class Fleet:
    gateway: Gateway
    client: httpx.AsyncClient
    fakes: list[FakeWorker]
    ids: list[str]


@pytest.fixture
async def fleet(open_with: Open, start_workers: StartWorkers) -> Fleet:
    """Two fake workers serving model "m" behind a gateway of their own."""
    fakes = await start_workers(2, model="m")
    gateway, client = await open_with(breaker_cooldown_secs=0.05)
    ids = await register(gateway, [fake.port for fake in fakes], health=PROBED)
    return Fleet(gateway, client, fakes, ids)


async def test_a_worker_put_with_a_new_spec_again_and_again_costs_no_request(
    fleet: Fleet,
) -> None:
    port, worker_id = fleet.fakes[0].port, fleet.ids[0]

    async def replace_repeatedly(traffic: Traffic) -> None:
        for priority in range(40, 50):
            body = {"url": f"127.0.0.1:{port}", "priority": priority, "health": FAST_HEALTH}
            answer = await fleet.client.put(f"/workers/{worker_id}", json=body)
            assert answer.status_code == 202
            await traffic.after(50)
        await wait_until(
            fleet.gateway, lambda: fleet.gateway.get_worker(worker_id).spec.priority == 49
        )

    traffic = Traffic(fleet.client)
    with trio.fail_after(60):
        await traffic.run(8, replace_repeatedly)
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert set(traffic.workers) == set(fleet.ids)


async def test_a_single_worker_put_while_serving_costs_no_request(
    open_with: Open, start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1, model="m")
    gateway, client = await open_with()
    [worker_id] = await register(gateway, [fake.port])

    async def replace_repeatedly(traffic: Traffic) -> None:
        for priority in range(10):
            body = {"url": f"127.0.0.1:{fake.port}", "priority": priority}
            assert (await client.put(f"/workers/{worker_id}", json=body)).status_code == 202
            await traffic.after(30)

    traffic = Traffic(client)
    with trio.fail_after(60):
        await traffic.run(8, replace_repeatedly)
    assert set(traffic.statuses) == {200}, traffic.statuses


async def test_a_worker_deleted_and_posted_back_costs_no_request(fleet: Fleet) -> None:
    gateway, client = fleet.gateway, fleet.client

    async def remove_and_re_add(traffic: Traffic) -> None:
        worker_id = fleet.ids[0]
        for _ in range(5):
            assert (await client.delete(f"/workers/{worker_id}")).status_code == 202
            await gateway.wait_removed(worker_id, 10)
            await traffic.after(20)
            body = {"url": f"127.0.0.1:{fleet.fakes[0].port}", "health": FAST_HEALTH}
            created = await client.post("/workers", json=body)
            assert created.status_code == 202, created.text
            worker_id = created.json()["worker_id"]
            await gateway.wait_status(worker_id, "ready", 10)
            await traffic.after(20)

    traffic = Traffic(client)
    with trio.fail_after(60):
        await traffic.run(8, remove_and_re_add)
    assert set(traffic.statuses) == {200}, traffic.statuses


async def test_a_worker_whose_health_starts_failing_costs_no_request(fleet: Fleet) -> None:
    gateway, failing = fleet.gateway, fleet.ids[0]

    async def fail_health(traffic: Traffic) -> None:
        fleet.fakes[0].config.fail_health = True
        await wait_until(gateway, lambda: not gateway.get_worker(failing).is_healthy)
        await traffic.after(10)  # requests routed before the flip have finished
        before = traffic.workers[failing]
        await traffic.after(100)
        assert traffic.workers[failing] == before  # no longer routed to

    traffic = Traffic(fleet.client)
    with trio.fail_after(60):
        await traffic.run(8, fail_health)
    assert set(traffic.statuses) == {200}, traffic.statuses


async def test_a_worker_process_killed_and_restarted_costs_no_request(
    open_with: Open, start_workers: StartWorkers
) -> None:
    [steady] = await start_workers(1, model="m")
    gateway, client = await open_with(breaker_cooldown_secs=0.05)
    processes = [await _start(0)]
    port = processes[0].port  # type: ignore[attr-defined]
    try:
        ports = [steady.port, port]
        [steady_id, restarted_id] = await register(gateway, ports, health=PROBED)

        async def kill_and_restart(traffic: Traffic) -> None:
            processes[-1].kill()  # SIGKILL: in-flight requests are reset, new connects refused
            await processes[-1].wait()
            await traffic.after(100)
            before = traffic.workers[restarted_id]
            processes.append(await _start(port))
            await traffic.after(300)
            assert traffic.workers[restarted_id] > before  # it serves again, under the same id

        traffic = Traffic(client)
        with trio.fail_after(60):
            await traffic.run(8, kill_and_restart)
    finally:
        for process in processes:
            process.kill()
            await process.wait()
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert traffic.workers[steady_id] > 0


async def _start(port: int) -> trio.Process:
    """A fake worker process on ``port`` (0: any free port, kept as ``process.port``)."""
    where = ["--count", "1"] if port == 0 else ["--ports", str(port)]
    command = [sys.executable, "scripts/fake_worker.py", *where, "--model", "m"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, "the fake worker exited before it listened"
        line += chunk
    await process.stdout.aclose()
    [bound] = json.loads(line)["listening"]
    assert port in (0, bound)
    process.port = bound  # type: ignore[attr-defined]
    return process
