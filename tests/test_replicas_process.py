"""Three replicas as real processes (`python -m api.cli serve --state postgresql://...`) on one
real PostgreSQL, clients talking to each directly over HTTP."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from scripts.bench_churn import Child, gateway_command
from scripts.postgres_server import PostgresServer
from tests.conftest import StartWorkers

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LEASE_SECS = 1.0
SPELLINGS = ("127.0.0.1:{port}", "http://127.0.0.1:{port}", "HTTP://127.0.0.1:{port}/")


class Replicas:
    def __init__(self, url: str) -> None:
        self.url = url
        self.children: list[Child] = []
        self.urls: list[str] = []
        self.retired: list[Child] = []  # replaced by a restart

    async def start(self, index: int, *, port: int = 0) -> str:
        command = gateway_command(
            "--port",
            str(port),
            "--state",
            self.url,
            "--replica-lease-secs",
            str(LEASE_SECS),
            "--instance-id",
            f"replica-{index}",
            "--max-connection-attempts",
            "100",
            "--registration-timeout-secs",
            "30",
        )
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the fixture
        child = Child(f"replica-{index}", command, log)
        base: str = await child.start()
        if index < len(self.children):
            self.retired.append(self.children[index])
            self.children[index], self.urls[index] = child, base
        else:
            self.children.append(child)
            self.urls.append(base)
        return base

    def kill(self, index: int) -> None:
        process = self.children[index].process
        assert process is not None
        process.kill()  # SIGKILL

    async def stop(self) -> None:
        for child in self.children:
            await child.stop()


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[Replicas]:
    group = Replicas(postgres_url)
    try:
        for index in range(3):
            await group.start(index)
        yield group
    finally:
        await group.stop()
        for child in group.retired + group.children:
            child.log.close()


@pytest.fixture
async def clients(replicas: Replicas) -> AsyncIterator[list[httpx.AsyncClient]]:
    made = [httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) for url in replicas.urls]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


async def wait_ready(client: httpx.AsyncClient, worker_id: str) -> dict[str, Any]:
    answer = await client.get(
        f"/workers/{worker_id}", params={"wait_for": "ready", "timeout_secs": 20}
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["status"] == "ready"
    return body


async def test_fifty_concurrent_posts_in_different_spellings_give_one_202_and_49_conflicts(
    clients: list[httpx.AsyncClient],
) -> None:
    answers: list[httpx.Response] = []

    async def post(index: int) -> None:
        url = SPELLINGS[index % 3].format(port=9)
        answers.append(await clients[index % 3].post("/workers", json={"url": url}))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(post, index)
    created = [answer.json() for answer in answers if answer.status_code == 202]
    conflicts = [answer.json() for answer in answers if answer.status_code == 409]
    assert len(created) == 1
    assert len(conflicts) == 49
    assert {body["worker_id"] for body in conflicts} == {created[0]["worker_id"]}


async def test_a_worker_posted_on_a_is_ready_and_routed_on_b_and_c(
    clients: list[httpx.AsyncClient], start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1)
    a, b, c = clients
    with trio.fail_after(60):
        posted = await a.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
        assert posted.status_code == 202
        worker_id = posted.json()["worker_id"]
        for other in (b, c):
            await wait_ready(other, worker_id)
            answer = await other.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200
            assert answer.headers["x-worker-id"] == worker_id
    assert fake.counts["POST /v1/chat/completions"] == 2


async def test_delete_on_a_and_post_again_on_b_never_reuse_an_id_nor_404_a_returned_one(
    clients: list[httpx.AsyncClient],
) -> None:
    a, b, _ = clients
    seen: set[str] = set()
    with trio.fail_after(120):
        posted = await a.post("/workers", json={"url": "127.0.0.1:9"})
        worker_id = posted.json()["worker_id"]
        for _ in range(100):
            assert worker_id not in seen
            seen.add(worker_id)
            deleted = await a.delete(f"/workers/{worker_id}")
            assert deleted.status_code == 202, deleted.text
            posted = await b.post("/workers", json={"url": "http://127.0.0.1:9"})
            assert posted.status_code == 202, posted.text
            worker_id = posted.json()["worker_id"]
            found = await a.get(f"/workers/{worker_id}")  # the id B just returned, on A
            assert found.status_code == 200, found.text
    assert len(seen) == 100


async def test_sigkill_of_the_replica_running_a_registration_hands_it_to_another(
    replicas: Replicas, clients: list[httpx.AsyncClient], start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1, startup_delay=4.0)  # answers 503 "loading" for 4 s
    a, b, c = clients
    with trio.fail_after(60):
        posted = await a.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
        assert posted.status_code == 202
        worker_id = posted.json()["worker_id"]
        replicas.kill(0)  # A held the job; it dies in the middle of detecting
        killed = trio.current_time()
        ready = await wait_ready(b, worker_id)
        # the lease (1 s), a claim round (0.2 s), then detection of a worker loading for 4 s
        assert trio.current_time() - killed < 10
        assert ready["job_status"]["job_type"] == "AddWorker"
        for client in (b, c):
            listed = (await client.get("/workers")).json()["workers"]
            assert [w["id"] for w in listed] == [worker_id]  # no duplicate


async def test_a_stream_through_b_finishes_while_a_deletes_its_worker_then_it_is_removed(
    clients: list[httpx.AsyncClient], start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1, token_delay=0.05)
    a, b, c = clients
    with trio.fail_after(60):
        posted = await a.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
        worker_id = posted.json()["worker_id"]
        for client in clients:
            await wait_ready(client, worker_id)
        body = {**CHAT, "stream": True, "max_tokens": 60}  # 3 s: longer than a DELETE waits
        lines: list[str] = []
        async with b.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            async for line in streamed.aiter_lines():
                if not line:
                    continue  # between events
                lines.append(line)
                if len(lines) == 2:
                    deleted = await a.delete(f"/workers/{worker_id}")
                    assert deleted.status_code == 202
                    assert deleted.json()["worker_status"] == "draining"
                    draining = await c.get(
                        f"/workers/{worker_id}",
                        params={"wait_for": "draining", "timeout_secs": 10},
                    )
                    assert draining.json()["status"] == "draining"
                    refused = await c.post("/v1/chat/completions", json=CHAT)
                    assert refused.status_code == 503  # nothing new is routed to it
                    assert (await a.get(f"/workers/{worker_id}")).status_code == 200
        assert lines[-1] == "data: [DONE]"
        assert sum(line.startswith("data: {") for line in lines) == 60  # the whole stream
        for client in clients:
            gone = await client.get(
                f"/workers/{worker_id}", params={"wait_for": "ready", "timeout_secs": 10}
            )
            assert gone.status_code == 404


async def test_a_replica_restarted_under_load_catches_up_with_only_refused_connections(
    replicas: Replicas, clients: list[httpx.AsyncClient], start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1)
    a, b, _ = clients
    port = int(replicas.urls[1].rsplit(":", 1)[1])
    errors: list[str] = []
    answered = 0
    with trio.fail_after(90):
        posted = await a.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
        first_id = posted.json()["worker_id"]
        await wait_ready(b, first_id)
        restarted = trio.Event()

        async def load() -> None:
            nonlocal answered
            async with httpx.AsyncClient(base_url=replicas.urls[1], trust_env=False) as fresh:
                while not restarted.is_set() or answered < 50:
                    try:
                        answer = await fresh.post("/v1/chat/completions", json=CHAT)
                    except httpx.ConnectError:  # nobody listens: the one refusal allowed
                        await restarted.wait()  # then only once it listens again
                        continue
                    except httpx.TransportError as error:
                        errors.append(repr(error))
                        continue
                    if answer.status_code != 200:
                        errors.append(f"{answer.status_code} {answer.text}")
                    answered += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await replicas.children[1].stop()  # SIGTERM: a graceful stop
            second = await a.post("/workers", json={"url": "127.0.0.1:9"})  # while B is down
            await replicas.start(1, port=port)
            restarted.set()
        again = httpx.AsyncClient(base_url=replicas.urls[1], trust_env=False)
        async with again:
            found = await again.get(f"/workers/{second.json()['worker_id']}")
            assert found.status_code == 200  # what happened while it was down
    assert errors == []
    assert answered >= 50


async def test_while_postgres_restarts_writes_get_503_and_reads_and_routing_go_on(
    start_workers: StartWorkers,
) -> None:
    [fake] = await start_workers(1)
    with PostgresServer() as server:
        group = Replicas(server.create_database())
        try:
            for index in range(2):
                await group.start(index)
            async with (
                httpx.AsyncClient(base_url=group.urls[0], trust_env=False, timeout=30) as a,
                httpx.AsyncClient(base_url=group.urls[1], trust_env=False, timeout=30) as b,
            ):
                with trio.fail_after(90):
                    posted = await a.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
                    worker_id = posted.json()["worker_id"]
                    await wait_ready(b, worker_id)
                    await trio.to_thread.run_sync(server.stop)
                    refused = await a.post("/workers", json={"url": "127.0.0.1:9"})
                    assert (refused.status_code, refused.json()["code"]) == (
                        503,
                        "STORE_UNAVAILABLE",
                    )
                    assert (await b.delete(f"/workers/{worker_id}")).status_code == 503
                    for client in (a, b):
                        assert (await client.get(f"/workers/{worker_id}")).status_code == 200
                        routed = await client.post("/v1/chat/completions", json=CHAT)
                        assert routed.status_code == 200
                    await trio.to_thread.run_sync(server.start)
                    again = await a.post("/workers", json={"url": "127.0.0.1:9"})
                    assert again.status_code == 202, again.text
                    found = await b.get(f"/workers/{again.json()['worker_id']}")
                    assert found.status_code == 200
        finally:
            await group.stop()
            for child in group.retired + group.children:
                child.log.close()
