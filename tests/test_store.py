"""The store interface's values, the in-memory store, and the writer thread (actors/store)."""

from __future__ import annotations

import ast
import os
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors.core.urls import parse_worker_url
from actors.store import (
    Batch,
    MemoryStore,
    Reservation,
    SqliteStore,
    StoredState,
    StoreInUse,
    identity_key,
    open_store,
    validate_batch,
)
from actors.store.base import change_from_payload, change_payload, owns_work
from actors.store.writer import open_store_writer

ROOT = Path(__file__).resolve().parent.parent


def plain(worker_id: str, url: str = "127.0.0.1:8000", spec_version: int = 1) -> dict[str, Any]:
    return {"id": worker_id, "spec": {"url": url}, "spec_version": spec_version}


# ---- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["127.0.0.1:8000", "http://127.0.0.1:8000", "grpcs://Host.Example:443", "http://[::1]:9"],
)
def test_identity_key_from_plain_data_is_the_url_key(url: str) -> None:
    canonical = parse_worker_url(url)
    assert identity_key({"spec": {"url": canonical.text}}) == canonical.key


def test_a_well_formed_batch_passes_validation() -> None:
    validate_batch(
        Batch(
            upserts={"a": plain("a"), "b": plain("b", "127.0.0.1:8001", 3)},
            deletes=["c"],
            id_prefix="p-",
            id_high_water=1000,
            next_job_id=7,
        )
    )
    assert Batch().empty
    assert not Batch(next_job_id=1).empty


@pytest.mark.parametrize(
    "batch",
    [
        Batch(upserts={"a": plain("b")}),
        Batch(upserts={"a": {"id": "a", "spec_version": 1}}),
        Batch(upserts={"a": {"id": "a", "spec": {"url": "x:1"}, "spec_version": "1"}}),
        Batch(upserts={"a": {"id": "a", "spec": {"url": "x:1"}, "spec_version": True}}),
        Batch(upserts={"a": plain("a")}, deletes=["a"]),
        Batch(deletes=[1]),  # type: ignore[list-item]
        Batch(id_prefix=""),
        Batch(id_high_water=-1),
        Batch(next_job_id=1.5),  # type: ignore[arg-type]
    ],
)
def test_a_malformed_batch_is_a_value_error(batch: Batch) -> None:
    with pytest.raises(ValueError):
        validate_batch(batch)


def test_a_reservation_moves_its_mark_only_when_a_value_passes_it() -> None:
    ids = Reservation(0, block=100)
    assert ids.advance(0) is None
    assert ids.advance(1) == 101  # the first id needs a mark
    assert [ids.advance(value) for value in (2, 50, 101)] == [None, None, None]
    assert ids.advance(102) == 202
    assert ids.advance(150) is None  # never backwards
    with pytest.raises(ValueError):
        Reservation(0, block=0)


def test_the_blocking_store_modules_import_no_trio() -> None:
    for name in (
        "__init__",
        "base",
        "memory",
        "lock",
        "sqlite",
        "sqlite_shared",
        "postgres",
        "postgres_replicas",
        "sqlite_replicas",
    ):
        tree = ast.parse((ROOT / "actors" / "store" / f"{name}.py").read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not imported & {"trio", "anyio", "outcome"}, name


# ---- the in-memory store -----------------------------------------------------------------


def test_the_memory_store_loads_empty_and_keeps_nothing() -> None:
    store = open_store(":memory:")
    assert isinstance(store, MemoryStore)
    assert not store.blocking
    store.commit(Batch(upserts={"a": plain("a")}, id_prefix="p-", id_high_water=10))
    assert store.load() == StoredState(workers={})
    with pytest.raises(ValueError):
        store.commit(Batch(upserts={"a": plain("b")}))
    store.close()
    with pytest.raises(RuntimeError):
        store.commit(Batch())


# ---- the writer thread -------------------------------------------------------------------


class RecordingStore:
    """A blocking store that records where and how its calls ran; ``gate`` holds commits."""

    blocking = True

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.active = 0
        self.max_active = 0
        self.committed: list[Batch] = []
        self.closed = False
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def load(self) -> StoredState:
        self.threads.add(threading.get_ident())
        return StoredState(workers={"a": plain("a")}, schema_version=1)

    def commit(self, batch: Batch) -> None:
        self.threads.add(threading.get_ident())
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.started.set()
        self.gate.wait(timeout=10)
        if batch.next_job_id == 666:
            with self.lock:
                self.active -= 1
            raise ValueError("refused")
        for _ in range(2000):  # a little work, so overlapping calls would be seen
            pass
        with self.lock:
            self.committed.append(batch)
            self.active -= 1

    def close(self) -> None:
        self.threads.add(threading.get_ident())
        self.closed = True


async def test_the_writer_runs_every_call_in_one_thread_off_the_event_loop() -> None:
    store = RecordingStore()
    async with open_store_writer(lambda: store) as writer:
        state = await writer.load()
        assert set(state.workers) == {"a"}
        for number in range(5):
            await writer.commit(Batch(next_job_id=number))
    assert store.closed
    assert len(store.threads) == 1
    assert threading.get_ident() not in store.threads
    assert [batch.next_job_id for batch in store.committed] == list(range(5))


async def test_the_writer_never_runs_two_commits_at_once() -> None:
    store = RecordingStore()
    async with open_store_writer(lambda: store) as writer, trio.open_nursery() as nursery:
        for number in range(50):
            nursery.start_soon(writer.commit, Batch(next_job_id=number))
    assert store.max_active == 1
    assert sorted(batch.next_job_id or 0 for batch in store.committed) == list(range(50))


async def test_a_commit_error_reaches_the_caller_and_the_writer_carries_on() -> None:
    store = RecordingStore()
    async with open_store_writer(lambda: store) as writer:
        with pytest.raises(ValueError, match="refused"):
            await writer.commit(Batch(next_job_id=666))
        await writer.commit(Batch(next_job_id=1))
    assert [batch.next_job_id for batch in store.committed] == [1]


async def test_a_cancelled_caller_does_not_abort_a_started_commit() -> None:
    store = RecordingStore()
    store.gate.clear()
    seen: list[str] = []
    async with open_store_writer(lambda: store) as writer:

        async def caller(scope_box: list[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                await writer.commit(Batch(next_job_id=42))
                seen.append("commit returned")  # before the next checkpoint
                await trio.lowlevel.checkpoint()
                seen.append("not reached")
            seen.append("cancelled" if scope.cancelled_caught else "not cancelled")

        scopes: list[trio.CancelScope] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, scopes)
            await trio.to_thread.run_sync(store.started.wait)
            scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [] and store.committed == []  # still waiting for the commit
            store.gate.set()
    assert [batch.next_job_id for batch in store.committed] == [42]
    assert seen == ["commit returned", "cancelled"]


async def test_the_writer_closes_the_store_even_when_its_block_is_cancelled() -> None:
    store = RecordingStore()
    with trio.CancelScope() as scope:
        async with open_store_writer(lambda: store) as writer:
            await writer.commit(Batch(next_job_id=1))
            scope.cancel()
            await trio.lowlevel.checkpoint()
    assert store.closed


async def test_a_failed_open_reaches_the_caller() -> None:
    def refuse() -> MemoryStore:
        raise OSError("no such disk")

    with pytest.raises(OSError, match="no such disk"):
        async with open_store_writer(refuse):
            pass  # pragma: no cover


async def test_a_memory_store_is_called_inline_without_a_thread() -> None:
    store = MemoryStore()
    async with open_store_writer(lambda: store) as writer:
        assert writer.store is store
        assert (await writer.load()).workers == {}
        await writer.commit(Batch(upserts={"a": plain("a")}))
    assert store.closed


async def test_the_writer_opens_commits_and_closes_a_sqlite_file_in_its_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    async with open_store_writer(partial(SqliteStore, path)) as writer:
        await writer.commit(Batch(upserts={"a": plain("a")}, id_prefix="p-", id_high_water=10))
        with pytest.raises(StoreInUse, match=f"pid {os.getpid()}"):
            async with open_store_writer(partial(SqliteStore, path)):
                pass  # pragma: no cover
    async with open_store_writer(partial(SqliteStore, path)) as writer:  # the lock was released
        state = await writer.load()
    assert (state.workers, state.id_prefix, state.id_high_water) == ({"a": plain("a")}, "p-", 10)


@pytest.mark.parametrize(
    ("plain", "owned"),
    [
        ({"status": "pending", "job": {"state": "queued"}, "spec": {}}, True),
        ({"status": "ready", "job": {"state": "running"}, "spec": {}}, True),  # a PUT detecting
        ({"status": "ready", "job": {"state": "succeeded"}, "spec": {}}, False),
        (
            {"status": "failed", "job": {"state": "failed"}, "spec": {"recheck_interval_secs": 30}},
            True,
        ),
        (
            {"status": "failed", "job": {"state": "failed"}, "spec": {"recheck_interval_secs": 0}},
            False,
        ),
        ({"status": "failed", "job": None, "spec": {"recheck_interval_secs": 30}}, False),
    ],
)
def test_a_replica_owns_an_active_job_or_a_scheduled_recheck(
    plain: dict[str, Any], owned: bool
) -> None:
    assert owns_work(plain) is owned


@pytest.mark.parametrize(
    "payload",
    [
        '{"upserts": [], "deletes": []}',
        '{"upserts": {}, "deletes": null}',
        '{"upserts": {"w": 1}, "deletes": []}',
        '{"upserts": {}, "deletes": [7]}',
        '{"upserts": {}}',
        "not json",
    ],
)
def test_a_change_log_entry_of_the_wrong_shape_is_a_value_error(payload: str) -> None:
    with pytest.raises(ValueError, match="change 3"):
        change_from_payload(3, "r", payload)


def test_a_batch_goes_through_the_change_log_unchanged() -> None:
    batch = Batch(upserts={"a": plain("a")}, deletes=["b"], id_high_water=5, next_job_id=9)
    change = change_from_payload(4, "r", change_payload(batch))
    assert (change.seq, change.replica, change.upserts, list(change.deletes)) == (
        4,
        "r",
        {"a": plain("a")},
        ["b"],
    )
    assert (change.id_high_water, change.next_job_id, change.full) == (5, 9, False)
