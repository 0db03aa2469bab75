"""Replicas: several gateways share one registry on a real PostgreSQL (in one trio run here;
tests/test_replicas_process.py runs them as processes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import psycopg
import pytest
import trio

from actors import worker_spec
from actors.core.codec import worker_to_plain
from actors.core.commands import StartJob
from actors.core.errors import (
    DetectionError,
    PreconditionFailed,
    WorkerAlreadyExists,
    WorkerNotFound,
)
from actors.core.jobs import UuidSource
from actors.core.model import (
    Detection,
    JobState,
    JobStatus,
    JobType,
    Worker,
    WorkerPatch,
    WorkerSpec,
    WorkerStatus,
)
from actors.core.table import WorkerTable
from actors.core.urls import WorkerUrl
from actors.dataplane.client import request, stream
from actors.registry.registry import Journal, StoreUnavailable
from actors.registry.service import Gateway
from actors.registry.startup import open_gateway
from actors.store.base import Change, StoredState
from actors.store.writer import StoreWriter
from scripts.fake_detector import InstantDetector
from scripts.postgres_server import PostgresServer
from tests.conftest import FAST, StartWorkers

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SPELLINGS = ("127.0.0.1:{port}", "http://127.0.0.1:{port}", "HTTP://127.0.0.1:{port}/")


@asynccontextmanager
async def replicas(
    url: str, count: int, *, instant: bool = False, **config: Any
) -> AsyncIterator[list[Gateway]]:
    """``count`` gateways on one database; ``instant``: detection always succeeds at once
    (addresses nothing listens on become ready), else the real detector."""
    async with AsyncExitStack() as stack:
        gateways = [
            await stack.enter_async_context(
                open_gateway(
                    replace(FAST, state=url, instance_id=f"replica-{n}", **config),
                    detector=InstantDetector() if instant else None,
                )
            )
            for n in range(count)
        ]
        yield gateways


async def gather(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls at once; each one's result or the error it raised."""
    results: list[Any] = [None] * len(calls)

    async def run(index: int, call: Callable[[], Any]) -> None:
        try:
            results[index] = await call()
        except Exception as error:  # the error is the result under test
            results[index] = error

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(run, index, call)
    return results


async def test_fifty_concurrent_posts_of_one_address_over_three_replicas_create_one_worker(
    postgres_url: str,
) -> None:
    async with replicas(postgres_url, 3) as gateways:
        with trio.fail_after(30):
            calls = [
                (
                    lambda g=gateways[i % 3], i=i: g.add_worker(
                        worker_spec(SPELLINGS[i % 3].format(port=9))
                    )
                )
                for i in range(50)
            ]
            results = await gather(*calls)
        created = [result for result in results if not isinstance(result, Exception)]
        refused = [result for result in results if isinstance(result, WorkerAlreadyExists)]
        assert len(created) == 1
        assert len(refused) == 49  # every other answer: 409 naming the same id
        assert {error.worker_id for error in refused} == {created[0].id}
        for gateway in gateways:  # every replica knows it (an id never 404s elsewhere)
            assert (await gateway.find_worker(created[0].id)).key == "127.0.0.1:9"


async def test_a_worker_posted_on_one_replica_is_ready_and_routed_on_the_others(
    postgres_url: str, start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1, model="m")
    async with replicas(postgres_url, 3) as (a, b, c):
        with trio.fail_after(20):
            worker = await a.add_worker(worker_spec(f"127.0.0.1:{fake.port}"))
            for other in (b, c):
                assert (await other.wait_status(worker.id, "ready", 10)).id == worker.id
                answer = await request(other, "/v1/chat/completions", CHAT)
                assert (answer.status, answer.worker_id) == (200, worker.id)
        assert fake.counts["POST /v1/chat/completions"] == 2


async def test_delete_on_one_replica_and_post_again_on_another_never_reuses_an_id(
    postgres_url: str,
) -> None:
    seen: set[str] = set()
    async with replicas(postgres_url, 2) as (a, b):
        with trio.fail_after(60):
            worker = await a.add_worker(worker_spec("127.0.0.1:9"))
            for _ in range(30):
                seen.add(worker.id)
                await a.remove_worker(worker.id)  # pending: gone at once, on every replica
                worker = await b.add_worker(worker_spec("http://127.0.0.1:9"))
                assert worker.id not in seen
                assert (await a.find_worker(worker.id)).id == worker.id  # never a 404 on A
    assert len(seen) == 30


async def test_if_match_is_decided_on_the_newest_version_whichever_replica_wrote_it(
    postgres_url: str,
) -> None:
    async with replicas(postgres_url, 2) as (a, b):
        with trio.fail_after(20):
            worker = await a.add_worker(worker_spec("127.0.0.1:9"))
            await b.find_worker(worker.id)
            patched = await a.update_worker(worker.id, WorkerPatch(priority=7), if_match=1)
            assert patched.spec_version == 2
            with pytest.raises(PreconditionFailed):
                await b.update_worker(worker.id, WorkerPatch(priority=8), if_match=1)
            again = await b.update_worker(worker.id, WorkerPatch(priority=9), if_match=2)
            assert (again.spec_version, again.spec.priority) == (3, 9)
            await a.sync()
            assert a.get_worker(worker.id).spec.priority == 9


async def test_a_stream_through_one_replica_outlives_a_delete_through_another(
    postgres_url: str, start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1, model="m", token_delay=0.02)
    async with replicas(postgres_url, 2) as (a, b):
        with trio.fail_after(30):
            worker = await a.add_worker(worker_spec(f"127.0.0.1:{fake.port}"))
            await b.wait_status(worker.id, "ready", 10)
            chunks: list[Any] = []
            chunks_at_removal: list[int] = []

            async def watch_removal() -> None:
                await a.wait_removed(worker.id, 30)
                chunks_at_removal.append(len(chunks))

            body = {**CHAT, "stream": True, "max_tokens": 40}
            async with (
                trio.open_nursery() as nursery,
                stream(b, "/v1/chat/completions", body) as events,
            ):
                assert events.worker_id == worker.id
                chunks.append(await events.__anext__())
                deleted = await a.remove_worker(worker.id)
                assert deleted.status is WorkerStatus.DRAINING
                nursery.start_soon(watch_removal)
                await b.wait_status(worker.id, "draining", 10)
                assert "m" not in a.snapshot.by_model  # nothing new is routed to it
                assert "m" not in b.snapshot.by_model
                async for chunk in events:
                    chunks.append(chunk)
                    if len(chunks) == 10:  # A had its idle record in by now, B not
                        assert a.snapshot.get(worker.id) is not None
            await b.wait_removed(worker.id, 10)
    assert len(chunks) > 10
    assert chunks_at_removal == [len(chunks)]  # removed only after the stream's last chunk


async def test_postgres_down_refuses_writes_but_reads_and_routing_go_on(
    start_workers: StartWorkers,
) -> None:
    [fake] = await start_workers(1, model="m")
    with PostgresServer() as server:
        url = server.create_database()
        async with replicas(url, 2) as (a, b):
            with trio.fail_after(60):
                worker = await a.add_worker(worker_spec(f"127.0.0.1:{fake.port}"))
                await b.wait_status(worker.id, "ready", 10)
                await trio.to_thread.run_sync(server.stop)
                with pytest.raises(StoreUnavailable):
                    await a.add_worker(worker_spec("127.0.0.1:10"))
                with pytest.raises(StoreUnavailable):
                    await b.remove_worker(worker.id)
                assert b.get_worker(worker.id).status is WorkerStatus.READY
                for gateway in (a, b):
                    answer = await request(gateway, "/v1/chat/completions", CHAT)
                    assert (answer.status, answer.worker_id) == (200, worker.id)
                await trio.to_thread.run_sync(server.start)
                second = await b.add_worker(worker_spec("127.0.0.1:9"))  # reconnects
                assert (await a.find_worker(second.id)).id == second.id
                await a.remove_worker(worker.id)
                await b.wait_removed(worker.id, 10)
                with pytest.raises(WorkerNotFound):
                    await b.find_worker(worker.id)


class StuckDetector(InstantDetector):
    """Detection that never ends (until cancelled): the replica running it 'hangs'."""

    def __init__(self) -> None:
        super().__init__()
        self.started = trio.Event()

    async def detect(self, spec: WorkerSpec) -> Detection:
        self.started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_registration_whose_replica_stops_is_finished_by_another_within_the_lease(
    postgres_url: str,
) -> None:
    config = replace(FAST, state=postgres_url, replica_lease_secs=0.5)
    stuck = StuckDetector()
    with trio.fail_after(30):
        async with open_gateway(replace(config, instance_id="b"), detector=InstantDetector()) as b:
            async with open_gateway(replace(config, instance_id="a"), detector=stuck) as a:
                worker = await a.add_worker(worker_spec("127.0.0.1:9"))
                await stuck.started.wait()
                assert (await b.find_worker(worker.id)).status is WorkerStatus.PENDING
            # a is gone (its heartbeat stopped; its job left running in the database)
            stopped = trio.current_time()
            ready = await b.wait_status(worker.id, "ready", 20)
            assert trio.current_time() - stopped < 0.5 + 2.0  # the lease, then a round
            assert ready.job is not None and ready.job.job_id != worker.job.job_id  # type: ignore[union-attr]
            assert [w.id for w in b.list_workers()] == [worker.id]


async def test_only_the_holder_of_the_health_lease_probes_and_the_others_follow(
    postgres_url: str,
) -> None:
    probes: dict[str, int] = {"a": 0, "b": 0}

    class Counting(InstantDetector):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name
            self.healthy = True

        async def check_health(self, spec: WorkerSpec, url: WorkerUrl) -> str | None:
            await trio.lowlevel.checkpoint()
            probes[self.name] += 1
            return None if self.healthy else "down"

    config = replace(FAST, state=postgres_url, replica_lease_secs=0.5)
    health = {"check_interval_secs": 0.1, "failure_threshold": 1}
    detectors = {name: Counting(name) for name in probes}
    with trio.fail_after(30):
        async with (
            open_gateway(replace(config, instance_id="a"), detector=detectors["a"]) as a,
            open_gateway(replace(config, instance_id="b"), detector=detectors["b"]) as b,
        ):
            worker = await a.add_worker(worker_spec("127.0.0.1:9", health=health))
            await b.wait_status(worker.id, "ready", 10)
            for detector in detectors.values():
                detector.healthy = False
            while b.get_worker(worker.id).is_healthy or a.get_worker(worker.id).is_healthy:
                await b.wait_changed()
    assert sorted(probes.values())[0] == 0  # one replica probed, the other never did
    assert sorted(probes.values())[1] >= 1


async def test_a_watch_on_one_replica_shows_every_change_made_through_another(
    postgres_url: str,
) -> None:
    async with replicas(postgres_url, 2) as (a, b):
        with trio.fail_after(20):
            async with b.watch() as events:
                assert (await events.__anext__()).kind == "synced"  # nothing yet
                worker = await a.add_worker(worker_spec("127.0.0.1:9"))
                await a.update_worker(worker.id, WorkerPatch(priority=3))
                await a.remove_worker(worker.id)
                seen: list[str] = []
                while not seen or seen[-1] != "removed":
                    event = await events.__anext__()
                    assert event.worker is not None and event.worker.id == worker.id
                    seen.append(event.kind)
    assert seen[0] == "created" and seen[-1] == "removed"  # in order (changes B took in
    # together are one step of its feed, as a batch is in one gateway's)


class Unreachable(InstantDetector):
    async def detect(self, spec: WorkerSpec) -> Detection:
        await trio.lowlevel.checkpoint()
        raise DetectionError("connection refused")


async def test_the_recheck_of_a_failed_worker_outlives_the_replica_that_scheduled_it(
    postgres_url: str,
) -> None:
    config = replace(FAST, state=postgres_url, replica_lease_secs=0.5)
    spec = worker_spec("127.0.0.1:9", max_connection_attempts=1, recheck_interval_secs=3600)
    with trio.fail_after(30):
        async with open_gateway(replace(config, instance_id="b"), detector=InstantDetector()) as b:
            async with open_gateway(replace(config, instance_id="a"), detector=Unreachable()) as a:
                worker = await a.add_worker(spec)
                failed = await b.wait_status(worker.id, "failed", 10)
                assert failed.job is not None and not failed.job.active
            # a stopped with the recheck an hour away; b takes it over within the lease
            ready = await b.wait_status(worker.id, "ready", 20)
            assert ready.job is not None and ready.job.job_type == "RecheckWorker"


async def test_an_unreadable_change_in_the_log_is_refused_with_503_and_the_replica_serves_on(
    postgres_url: str,
) -> None:
    async with replicas(postgres_url, 1) as (a,):
        with trio.fail_after(20):
            worker = await a.add_worker(worker_spec("127.0.0.1:9"))
            foreign = '{"upserts": {"x": {"id": "x", "spec": "???"}}, "deletes": [], ' + (
                '"id_prefix": null, "id_high_water": 0, "next_job_id": 0}'
            )

            def write_foreign_change() -> None:  # not a gateway's doing (one transaction)
                with psycopg.connect(postgres_url) as conn, conn.transaction():
                    seq = conn.execute(
                        "UPDATE tmg_meta SET change_seq = change_seq + 1 RETURNING change_seq"
                    ).fetchone()
                    assert seq is not None
                    conn.execute(
                        "INSERT INTO tmg_changes (seq, replica, payload) VALUES (%s, 'x', %s)",
                        (seq[0], foreign),
                    )

            await trio.to_thread.run_sync(write_foreign_change)
            with pytest.raises(StoreUnavailable):
                await a.add_worker(worker_spec("127.0.0.1:10"))
            assert a.get_worker(worker.id).id == worker.id  # reads go on
            with pytest.raises(StoreUnavailable):
                await a.update_worker(worker.id, WorkerPatch(priority=2))


async def test_a_delete_of_an_idle_ready_worker_has_it_gone_everywhere_when_it_returns(
    postgres_url: str,
) -> None:
    async with replicas(postgres_url, 3, instant=True) as (a, b, c):
        with trio.fail_after(20):
            for _ in range(5):
                worker = await a.add_worker(worker_spec("127.0.0.1:9"))
                for gateway in (a, b, c):
                    await gateway.wait_status(worker.id, "ready", 10)
                await a.remove_worker(worker.id)
                assert a.snapshot.get(worker.id) is None  # removed, not still draining
                again = await b.add_worker(worker_spec("http://127.0.0.1:9"))  # no 409
                await b.remove_worker(again.id)


def test_our_own_change_coming_back_from_the_log_runs_the_jobs_it_started() -> None:
    """A commit answered with an error (the connection dropped during COMMIT) but stored:
    its change comes back through the log, and the jobs it started are run here, since no
    other replica claims the jobs of a live one."""

    class OneOfReplicas:
        shared, blocking, replica = True, False, "me"

    table = WorkerTable()
    ids = UuidSource()
    journal = Journal(StoreWriter(OneOfReplicas(), None), table, ids, StoredState(workers={}))  # type: ignore[arg-type]
    job = JobStatus(job_id=5, job_type=JobType.ADD, state=JobState.QUEUED, updated_at=1.0)
    pending = Worker.pending(id=ids(), spec=worker_spec("127.0.0.1:9"), job=job, now=1.0)
    plain = worker_to_plain(pending)
    ours = Change(seq=1, upserts={pending.id: plain}, replica="me", next_job_id=6)
    effects, _ = journal.absorb([ours])
    assert [(e.worker_id, e.job_id) for e in effects if isinstance(e, StartJob)] == [
        (pending.id, 5)
    ]
    theirs = Change(seq=2, upserts={pending.id: plain}, replica="other", next_job_id=6)
    effects, _ = journal.absorb([theirs])
    assert not [e for e in effects if isinstance(e, StartJob)]  # theirs run theirs


async def test_writes_racing_on_three_replicas_all_land_without_a_503(postgres_url: str) -> None:
    """Each replica's clients keep PATCHing at once: a batch that finds others committed since
    is decided again inside the writers' lock, so no write is refused for contention."""
    async with replicas(postgres_url, 3, instant=True) as gateways:
        with trio.fail_after(60):
            workers = [
                await gateways[0].add_worker(worker_spec(f"127.0.0.1:{9000 + n}")) for n in range(6)
            ]
            for gateway in gateways:
                await gateway.sync()
            refused: list[Exception] = []

            async def patch(gateway: Gateway, worker_id: str) -> None:
                for n in range(15):
                    try:
                        await gateway.update_worker(worker_id, WorkerPatch(priority=n + 1))
                    except StoreUnavailable as error:
                        refused.append(error)

            async with trio.open_nursery() as nursery:
                for n, worker in enumerate(workers):
                    nursery.start_soon(patch, gateways[n % 3], worker.id)
            await gateways[1].sync()
    assert refused == []
    assert [gateways[1].get_worker(w.id).spec_version for w in workers] == [16] * 6
