"""A durable registry in one process: every accepted change is in the state file when its
answer comes, a gateway reopened on the file carries on where it was, and a store that refuses
a write costs that write only."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from actors import (
    GatewayConfig,
    HealthConfig,
    StoreUnavailable,
    WorkerPatch,
    WorkerStatus,
    open_gateway,
    worker_spec,
)
from actors.core.codec import worker_to_plain
from actors.registry.service import Gateway
from actors.store import Batch, MemoryStore, SqliteStore, StoredState, StoreError
from api.serve import serve_api
from tests.conftest import FAST, wait_until

MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "sglang"}]}
# what a worker's record must show in the file once its answer came (the job's progress may
# be a step further: the registrar keeps working meanwhile)
COMPARED = ("id", "spec", "spec_version", "status", "is_healthy", "detection")


class FakeFleet:
    """Mocked workers by address: ``up`` ones answer detection and health, ``hold`` ones keep
    detection waiting (a registration in flight), the rest refuse connections."""

    def __init__(self) -> None:
        self.up: set[str] = set()
        self.hold: set[str] = set()
        self.probes: dict[str, int] = {}
        self.release = trio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        address = f"{request.url.host}:{request.url.port}"
        if request.url.path == "/health":
            self.probes[address] = self.probes.get(address, 0) + 1
        if address in self.hold and request.url.path != "/health":
            await self.release.wait()
        if address not in self.up:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(404)


class InlineStore:
    """A real SqliteStore called on the event loop (``blocking`` False), so that a test on
    virtual time sees no thread: the writer calls it inline."""

    blocking = False

    def __init__(self, path: Path) -> None:
        self.store = SqliteStore(path)

    def load(self) -> StoredState:
        return self.store.load()

    def commit(self, batch: Batch) -> None:
        self.store.commit(batch)

    def close(self) -> None:
        self.store.close()


class RefusingStore(MemoryStore):
    """An in-memory store whose commits fail (as a full disk would) while ``refuse`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = False
        self.commits = 0

    def commit(self, batch: Batch) -> None:
        if self.refuse:
            raise StoreError("test.db", "a commit failed and was rolled back: disk I/O error")
        super().commit(batch)
        self.commits += 1


def stored_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The workers in the state file, read by another connection (as another process would)."""
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        return {row[0]: json.loads(row[1]) for row in conn.execute("SELECT id, data FROM workers")}


def reopen(path: Path) -> StoredState:
    with SqliteStore(path) as store:
        return store.load()


def assert_in_file(path: Path, gateway: Gateway, worker_id: str) -> None:
    """The worker's record in the file is the published one (or, removed, absent from both)."""
    rows = stored_rows(path)
    worker = gateway.snapshot.get(worker_id)
    if worker is None:
        assert worker_id not in rows
        return
    expected = worker_to_plain(worker)
    assert {k: rows[worker_id][k] for k in COMPARED} == {k: expected[k] for k in COMPARED}


@asynccontextmanager
async def gateway_on(path: Path, fleet: FakeFleet, **config: Any) -> AsyncIterator[Gateway]:
    settings = replace(FAST, state=str(path), **config)
    async with open_gateway(settings, http_transport=httpx.MockTransport(fleet)) as gateway:
        yield gateway


async def test_every_kind_of_change_is_in_the_state_file_when_its_answer_comes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    fleet = FakeFleet()
    fleet.up |= {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.4:8000"}
    fleet.hold.add("10.0.0.4:8000")
    health = HealthConfig(check_interval_secs=0.1, failure_threshold=1, success_threshold=1)
    with trio.fail_after(20):
        async with gateway_on(path, fleet, recheck_interval_secs=0) as gateway:
            # create, attempt, ready
            ready = await gateway.add_worker(
                worker_spec("10.0.0.1:8000", labels={"zone": "a"}, health=health)
            )
            assert_in_file(path, gateway, ready.id)
            await gateway.wait_status(ready.id, "ready", 5)
            assert_in_file(path, gateway, ready.id)
            # failed
            failed = await gateway.add_worker(
                worker_spec("10.0.0.3:8000", max_connection_attempts=1)
            )
            await gateway.wait_status(failed.id, "failed", 5)
            assert_in_file(path, gateway, failed.id)
            # update (PATCH)
            patched = await gateway.update_worker(
                ready.id, WorkerPatch(labels={"zone": "b", "tier": "gold"})
            )
            assert patched.spec_version == 2
            assert_in_file(path, gateway, ready.id)
            assert stored_rows(path)[ready.id]["spec"]["labels"] == {"zone": "b", "tier": "gold"}
            # replace (PUT): in flight it is recorded with the spec it detects, then swapped
            fleet.hold.add("10.0.0.1:8000")
            await gateway.replace_worker(
                ready.id, worker_spec("10.0.0.1:8000", priority=7, health=health)
            )
            assert stored_rows(path)[ready.id]["replacing"]["priority"] == 7
            fleet.hold.discard("10.0.0.1:8000")
            fleet.release.set()
            await wait_until(gateway, lambda: gateway.get_worker(ready.id).spec_version == 3)
            assert_in_file(path, gateway, ready.id)
            assert "replacing" not in stored_rows(path)[ready.id]
            # health flip
            fleet.up.discard("10.0.0.1:8000")
            await wait_until(gateway, lambda: not gateway.get_worker(ready.id).is_healthy)
            assert_in_file(path, gateway, ready.id)
            fleet.up.add("10.0.0.1:8000")
            await wait_until(gateway, lambda: gateway.get_worker(ready.id).is_healthy)
            # drain: a busy ready worker is draining in the file; then removed
            other = await gateway.add_worker(worker_spec("10.0.0.2:8000"))
            await gateway.wait_status(other.id, "ready", 5)
            gateway.inflight.acquire(other.id)
            draining = await gateway.remove_worker(other.id)
            assert draining.status is WorkerStatus.DRAINING
            assert stored_rows(path)[other.id]["status"] == "draining"
            gateway.inflight.release(other.id)
            await gateway.wait_removed(other.id, 5)
            assert other.id not in stored_rows(path)
            # remove: a failed worker and an idle ready one go before the answer
            await gateway.remove_worker(failed.id)
            assert failed.id not in stored_rows(path)
            await gateway.remove_worker(ready.id)
            assert ready.id not in stored_rows(path)
            # a pending worker (its registration held in flight) is in the file as pending
            pending = await gateway.add_worker(worker_spec("10.0.0.4:8000"))
            assert stored_rows(path)[pending.id]["status"] == "pending"
            snapshot = {w.id: worker_to_plain(w) for w in gateway.snapshot.workers.values()}
    stored = reopen(path)
    assert set(stored.workers) == set(snapshot) == {pending.id}


async def test_a_gateway_reopened_on_its_file_has_the_same_workers_ids_versions_and_labels(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    fleet = FakeFleet()
    fleet.up |= {"10.0.0.1:8000", "10.0.0.2:8000"}
    fleet.hold.add("10.0.0.5:8000")
    with trio.fail_after(20):
        async with gateway_on(path, fleet) as gateway:
            ids = []
            for n in (1, 2):
                worker = await gateway.add_worker(worker_spec(f"10.0.0.{n}:8000"))
                await gateway.wait_status(worker.id, "ready", 5)
                ids.append(worker.id)
            await gateway.update_worker(ids[0], WorkerPatch(labels={"zone": "a"}, priority=9))
            failed = await gateway.add_worker(
                worker_spec("10.0.0.3:8000", max_connection_attempts=1)
            )
            await gateway.wait_status(failed.id, "failed", 5)
            pending = await gateway.add_worker(worker_spec("10.0.0.5:8000"))
            before = dict(gateway.snapshot.workers)
        fleet.hold.clear()
        fleet.up.add("10.0.0.5:8000")
        async with gateway_on(path, fleet) as gateway:
            after = gateway.snapshot.workers
            assert set(after) == set(before)
            for worker_id, worker in before.items():
                again = after[worker_id]
                assert (again.spec, again.spec_version, again.created_at) == (
                    worker.spec,
                    worker.spec_version,
                    worker.created_at,
                )
            assert after[ids[0]].spec.labels == {"zone": "a"} and after[ids[0]].spec_version == 2
            assert after[ids[0]].status is WorkerStatus.READY and after[ids[0]].is_routable
            assert after[failed.id].status is WorkerStatus.FAILED
            # the registration that was in flight starts again from its first attempt
            assert after[pending.id].status is WorkerStatus.PENDING
            await gateway.wait_status(pending.id, "ready", 5)


async def test_ids_are_never_handed_out_again_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    fleet = FakeFleet()
    seen: set[str] = set()
    with trio.fail_after(30):
        for run in range(3):
            async with gateway_on(path, fleet, recheck_interval_secs=0) as gateway:
                for n in range(30):
                    worker = await gateway.add_worker(
                        worker_spec(f"10.0.{run}.{n}:8000", max_connection_attempts=1)
                    )
                    assert worker.id not in seen
                    seen.add(worker.id)
                    if n % 2:
                        await gateway.remove_worker(worker.id)
            stored = reopen(path)
            assert stored.id_prefix is not None
            assert all(worker_id.startswith(stored.id_prefix) for worker_id in seen)
            assert stored.id_high_water >= max(int(w.rsplit("-", 1)[1], 16) for w in seen)
    assert len(seen) == 90
    assert len(reopen(path).workers) == 45


async def test_recovered_ready_workers_serve_at_once_and_are_probed_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "state.db"
    fleet = FakeFleet()
    fleet.up |= {"10.0.0.1:8000", "10.0.0.2:8000"}
    health = HealthConfig(check_interval_secs=60, timeout_secs=2, failure_threshold=3)
    config = replace(FAST, registration_timeout_secs=30)
    opened = partial(open_gateway, config, http_transport=httpx.MockTransport(fleet))
    async with opened(store=partial(InlineStore, path)) as gateway:
        ids = []
        for n in (1, 2):
            worker = await gateway.add_worker(worker_spec(f"10.0.0.{n}:8000", health=health))
            await gateway.wait_status(worker.id, "ready", 5)
            ids.append(worker.id)
    fleet.up.discard("10.0.0.2:8000")  # went away while the gateway was down
    fleet.probes.clear()
    async with opened(store=partial(InlineStore, path)) as gateway:
        start = trio.current_time()
        assert set(gateway.snapshot.by_model["m"]) == set(ids)  # routable before any probe
        assert all(gateway.get_worker(worker_id).is_routable for worker_id in ids)
        await wait_until(gateway, lambda: not gateway.get_worker(ids[1]).is_healthy)
        assert trio.current_time() - start <= health.timeout_secs  # one probe, not three
        assert fleet.probes["10.0.0.1:8000"] >= 1  # probed at once, not after 60 s
        assert gateway.get_worker(ids[0]).is_routable


async def test_a_store_that_refuses_a_commit_costs_that_write_only(
    nursery: trio.Nursery,
) -> None:
    fleet = FakeFleet()
    fleet.up.add("10.0.0.1:8000")
    store = RefusingStore()
    with trio.fail_after(20):
        async with open_gateway(
            FAST, http_transport=httpx.MockTransport(fleet), store=store
        ) as gateway:
            ready = await gateway.add_worker(worker_spec("10.0.0.1:8000"))
            await gateway.wait_status(ready.id, "ready", 5)
            before = gateway.snapshot
            store.refuse = True
            with pytest.raises(StoreUnavailable):
                await gateway.add_worker(worker_spec("10.0.0.2:8000"))
            with pytest.raises(StoreUnavailable):
                await gateway.update_worker(ready.id, WorkerPatch(priority=3))
            with pytest.raises(StoreUnavailable):
                await gateway.remove_worker(ready.id)
            # nothing of the refused writes is visible, and reads and routing go on
            assert gateway.snapshot is before
            assert gateway.get_worker(ready.id).spec_version == 1
            assert gateway.get_worker(ready.id).is_routable
            [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0"))
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                answer = await client.post("/workers", json={"url": "10.0.0.2:8000"})
                assert answer.status_code == 503
                assert answer.json()["code"] == "STORE_UNAVAILABLE"
                assert (await client.get(f"/workers/{ready.id}")).status_code == 200
                store.refuse = False
                answer = await client.post("/workers", json={"url": "10.0.0.2:8000"})
                assert answer.status_code == 202
                patched = await client.patch(f"/workers/{ready.id}", json={"priority": 3})
                assert patched.json()["spec_version"] == 2
            nursery.cancel_scope.cancel()


async def test_a_failed_worker_keeps_its_recheck_after_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "state.db"
    fleet = FakeFleet()
    config = replace(FAST, recheck_interval_secs=30)
    opened = partial(open_gateway, config, http_transport=httpx.MockTransport(fleet))
    async with opened(store=partial(InlineStore, path)) as gateway:
        worker = await gateway.add_worker(worker_spec("10.0.0.9:8000", max_connection_attempts=1))
        await gateway.wait_status(worker.id, "failed", 5)
    fleet.up.add("10.0.0.9:8000")  # it came up while the gateway was down
    async with opened(store=partial(InlineStore, path)) as gateway:
        assert gateway.get_worker(worker.id).status is WorkerStatus.FAILED
        start = trio.current_time()
        await gateway.wait_status(worker.id, "ready", 60)
        assert 30 <= trio.current_time() - start < 31


def test_the_state_setting_is_a_config_field() -> None:
    assert GatewayConfig().state == ":memory:"
    assert GatewayConfig(state="/var/lib/tmg/state.db").state == "/var/lib/tmg/state.db"
    with pytest.raises(ValueError, match="state"):
        GatewayConfig(state="")
