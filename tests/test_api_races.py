"""The races smg loses, run over real HTTP against a real gateway, and won."""

from __future__ import annotations

import random

import httpx
import trio

from actors.core.model import WorkerStatus
from actors.registry.service import Gateway
from tests.conftest import StartWorkers, wait_until


async def test_fifty_concurrent_posts_of_one_address_in_different_spellings_give_one_202(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    port = worker.port
    spellings = [
        f"127.0.0.1:{port}",
        f"http://127.0.0.1:{port}",
        f"HTTP://127.0.0.1:{port}/",
        f"http://127.0.0.1:{port}/",
        f"grpc://127.0.0.1:{port}",
    ]
    answers: list[httpx.Response] = []

    async def post(url: str) -> None:
        answers.append(await client.post("/workers", json={"url": url}))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(post, spellings[i % len(spellings)])
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code == 409]
    assert len(accepted) == 1
    assert len(refused) == 49
    winner = accepted[0].json()["worker_id"]
    assert {a.json()["worker_id"] for a in refused} == {winner}
    assert {a.json()["code"] for a in refused} == {"WORKER_ALREADY_EXISTS"}
    assert list(gateway.snapshot.workers) == [winner]


async def test_a_thousand_delete_then_repost_cycles_never_reuse_an_id_nor_404_a_fresh_one(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    address = f"127.0.0.1:{worker.port}"
    seen: set[str] = set()
    statuses: set[str] = set()
    with trio.fail_after(120):
        for cycle in range(1000):
            created = await client.post("/workers", json={"url": address})
            assert created.status_code == 202, (cycle, created.text)
            worker_id = created.json()["worker_id"]
            assert worker_id not in seen
            seen.add(worker_id)
            read = await client.get(f"/workers/{worker_id}")
            assert read.status_code == 200, (cycle, read.text)
            statuses.add(read.json()["status"])
            if cycle % 10 == 0:  # let some reach ready, so both DELETE paths are exercised
                await gateway.wait_status(worker_id, "ready", 10)
                statuses.add("ready")
            deleted = await client.delete(f"/workers/{worker_id}")
            assert deleted.status_code == 202, (cycle, deleted.text)
    assert len(seen) == 1000
    assert {"pending", "ready"} <= statuses
    assert gateway.snapshot.workers == {}


async def test_a_get_right_after_a_202_is_always_200(
    client: httpx.AsyncClient, start_workers: StartWorkers
) -> None:
    workers = await start_workers(20)
    reads: list[int] = []

    async def register_and_read(port: int) -> None:
        created = await client.post("/workers", json={"url": f"127.0.0.1:{port}"})
        assert created.status_code == 202
        reads.append((await client.get(created.headers["Location"])).status_code)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(register_and_read, worker.port)
    assert reads == [200] * 20


async def test_concurrent_puts_and_patches_leave_indexes_that_match_the_final_record(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    address = f"127.0.0.1:{worker.port}"
    rng = random.Random(7)
    with trio.fail_after(30):
        worker_id = (await client.post("/workers", json={"url": address})).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        answers: list[int] = []

        async def put(priority: int) -> None:
            body = {"url": address, "priority": priority, "labels": {"by": "put"}}
            answers.append((await client.put(f"/workers/{worker_id}", json=body)).status_code)

        async def patch(priority: int) -> None:
            body = {"priority": priority, "labels": {"by": "patch"}}
            answers.append((await client.patch(f"/workers/{worker_id}", json=body)).status_code)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(rng.choice((put, patch)), i)
        await wait_until(gateway, lambda: not gateway.get_worker(worker_id).job.active)  # type: ignore[union-attr]
        final = gateway.get_worker(worker_id)
        read = (await client.get(f"/workers/{worker_id}")).json()
    assert set(answers) <= {200, 202}
    assert len(answers) == 60
    snapshot = gateway.snapshot
    assert final.status is WorkerStatus.READY
    assert snapshot.by_key == {final.key: worker_id}
    assert snapshot.by_model == {"m": (worker_id,)}
    assert read["spec_version"] == final.spec_version
    assert read["priority"] == final.spec.priority
    assert read["labels"]["by"] == final.spec.labels["by"]
    assert read["job_status"]["status"] in ("succeeded", "cancelled", "failed")
