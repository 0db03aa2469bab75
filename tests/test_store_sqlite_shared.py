"""SharedSqliteStore on real files: replicas sharing one SQLite file, with the semantics of the
PostgreSQL store (numbered commits and ``Behind``, the constraints as backstop, the change feed,
replicas, drains, jobs and leases), the shared lock against a single gateway's, migration from
version 1, and two real processes (actors/store/sqlite_shared.py, actors/store/lock.py)."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from actors.store import (
    Batch,
    InUseByReplicas,
    MemoryStore,
    SharedSqliteStore,
    SqliteStore,
    StoreError,
    StoreInUse,
    open_store,
)
from actors.store import sqlite_shared as shared_module
from actors.store.base import Behind, Change, SharedStore, is_shared
from actors.store.lock import StateLock
from actors.store.sqlite_schema import APPLICATION_ID, SCHEMA_VERSION, TABLES

ROOT = Path(__file__).resolve().parent.parent
Open = Callable[..., SharedSqliteStore]


def plain(worker_id: str, url: str = "127.0.0.1:8000", spec_version: int = 1) -> dict[str, Any]:
    return {"id": worker_id, "spec": {"url": url}, "spec_version": spec_version}


def new(worker_id: str, url: str, **counters: Any) -> Batch:
    """A batch that creates one worker (``versions_before`` says it is new)."""
    return Batch(
        upserts={worker_id: plain(worker_id, url)}, versions_before={worker_id: None}, **counters
    )


def execute(path: Path, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Change the file behind the stores' backs."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(statement, params)


def query(path: Path, statement: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(statement).fetchall()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def open_shared(path: Path) -> Iterator[Open]:
    """``open_shared(replica="a", **options)``: a replica on this test's file, closed at the
    end."""
    stores: list[SharedSqliteStore] = []

    def open_one(replica: str = "a", **options: Any) -> SharedSqliteStore:
        store = SharedSqliteStore(path, replica=replica, **options)
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        store.close()


# ---- the schema --------------------------------------------------------------------------


def test_a_new_file_gets_the_schema_and_a_second_replica_reuses_it(
    path: Path, open_shared: Open
) -> None:
    first = open_shared("a")
    assert first.opened_version is None  # created now
    state = first.load()
    assert (state.workers, state.change_seq, state.schema_version) == ({}, 0, SCHEMA_VERSION)
    assert (state.id_prefix, state.id_high_water, state.next_job_id) == (None, 0, 1)
    assert first.commit_after(new("w1", "127.0.0.1:8001", id_prefix="p-"), 0) == 1

    second = open_shared("b")
    assert second.opened_version == SCHEMA_VERSION  # found, not recreated
    state = second.load()
    assert state.workers == {"w1": plain("w1", "127.0.0.1:8001")}
    assert (state.change_seq, state.id_prefix) == (1, "p-")
    tables = {name for (name,) in query(path, "SELECT name FROM sqlite_schema")}
    assert tables >= TABLES
    pragmas = query(path, "SELECT * FROM pragma_application_id, pragma_user_version")
    assert pragmas == [(APPLICATION_ID, SCHEMA_VERSION)]


def test_replicas_opening_a_new_file_at_once_create_it_once(path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        opening = [pool.submit(SharedSqliteStore, path, replica=f"r{n}") for n in range(4)]
    stores = [future.result() for future in opening if future.exception() is None]
    try:
        assert [future.exception() for future in opening] == [None] * 4
        versions = sorted(store.opened_version or 0 for store in stores)
        assert versions == [0, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION]
    finally:
        for store in stores:
            store.close()


def test_a_newer_schema_is_refused_by_the_first_replica_and_by_one_joining(
    path: Path, open_shared: Open
) -> None:
    newer = SCHEMA_VERSION + 1
    message = f"schema version {newer}, newer than this gateway's {SCHEMA_VERSION}"
    open_shared("a").close()
    execute(path, f"PRAGMA user_version = {newer}")
    with pytest.raises(StoreError, match=message):
        SharedSqliteStore(path, replica="a")  # alone: the file is inspected
    execute(path, f"PRAGMA user_version = {SCHEMA_VERSION}")
    open_shared("a")
    execute(path, f"PRAGMA user_version = {newer}")
    with pytest.raises(StoreError, match=message):
        SharedSqliteStore(path, replica="b")  # joining: checked through SQLite


def test_a_replica_joining_replicas_of_an_older_gateway_is_refused(
    path: Path, open_shared: Open
) -> None:
    open_shared("a")
    execute(path, "PRAGMA user_version = 1")  # as if the others ran an older schema
    execute(path, "UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="in use by replicas of an older gateway"):
        SharedSqliteStore(path, replica="b")


# ---- the shared lock -----------------------------------------------------------------------


def test_replicas_and_a_single_gateway_exclude_each_other(path: Path) -> None:
    replicas = [SharedSqliteStore(path, replica=name) for name in "ab"]
    with pytest.raises(StoreInUse) as refused:
        SqliteStore(path)
    assert isinstance(refused.value, InUseByReplicas)
    assert refused.value.holder_pid is None
    assert f"state file {path}: in use by gateway replicas" in str(refused.value)
    replicas[0].close()
    with pytest.raises(InUseByReplicas):  # one replica left is enough
        SqliteStore(path)
    replicas[1].close()

    with SqliteStore(path):
        with pytest.raises(StoreInUse) as refused:
            SharedSqliteStore(path, replica="a")
        assert refused.value.holder_pid == os.getpid()
        assert f"in use by another gateway (pid {os.getpid()}" in str(refused.value)
    with SharedSqliteStore(path, replica="a"):  # every lock was released
        pass


def test_a_single_gateway_slipping_in_while_a_replica_settles_wins(path: Path) -> None:
    lock = StateLock.acquire(path, shared=True)
    assert lock.alone  # nobody else: it would set the file up now
    assert lock._fd is not None
    fcntl.flock(lock._fd, fcntl.LOCK_UN)  # the moment flock(LOCK_SH) lets go of LOCK_EX
    single = StateLock.acquire(path)
    try:
        with pytest.raises(StoreInUse, match=f"pid {os.getpid()}"):
            lock.settle()
        assert not lock.held
        with pytest.raises(StoreInUse):  # not stuck on the set-up lock: it was released
            SharedSqliteStore(path, replica="b")
    finally:
        single.release()


def test_a_replica_leaves_no_pid_and_clears_a_stale_one(path: Path) -> None:
    lock = Path(f"{path}.lock")
    SqliteStore(path).close()
    lock.write_text("4242\n")  # a gateway killed -9 leaves its pid behind
    with SharedSqliteStore(path, replica="a"):
        assert lock.read_text() == ""
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "state.db",
        "state.db.lock",
        "state.db.setup.lock",
    ]


# ---- migration and a file passing between one gateway and replicas -------------------------


def make_version_1(path: Path) -> None:
    """A file as the version-1 gateway made it: workers and meta only."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE workers (id TEXT PRIMARY KEY, identity_key TEXT NOT NULL UNIQUE, "
        "spec_version INTEGER NOT NULL, data TEXT NOT NULL)"
    )
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    for number in (1, 2):
        worker = plain(f"w{number}", f"127.0.0.1:{8000 + number}", number)
        conn.execute(
            "INSERT INTO workers VALUES (?, ?, ?, ?)",
            (worker["id"], f"127.0.0.1:{8000 + number}", number, json.dumps(worker)),
        )
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [
            ("schema_version", 1),
            ("id_prefix", "old-"),
            ("id_high_water", 3000),
            ("next_job_id", 70),
        ],
    )
    conn.close()


@pytest.mark.parametrize("first", ["single-gateway", "replica"])
def test_a_version_1_file_is_migrated_keeping_its_workers_and_is_then_shared(
    path: Path, open_shared: Open, first: str
) -> None:
    make_version_1(path)
    opener = SqliteStore if first == "single-gateway" else SharedSqliteStore
    with opener(path) as store:
        assert store.opened_version == 1
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(path, "SELECT id FROM worker_ids ORDER BY id") == [("w1",), ("w2",)]

    a, b = open_shared("a"), open_shared("b")
    assert a.opened_version == SCHEMA_VERSION
    state = b.load()
    assert state.workers == {
        "w1": plain("w1", "127.0.0.1:8001", 1),
        "w2": plain("w2", "127.0.0.1:8002", 2),
    }
    assert (state.id_prefix, state.id_high_water, state.next_job_id) == ("old-", 3000, 70)
    assert state.change_seq == 0
    assert a.commit_after(Batch(deletes=["w1"]), 0) == 1
    assert b.changes_since(0) == [Change(1, {}, ["w1"], 0, 0, "a")]
    with pytest.raises(StoreError, match="refused the change"):  # w1 is known as stored
        b.commit_after(new("w1", "127.0.0.1:8009"), 1)


def test_a_file_written_by_a_single_gateway_is_shared_without_reusing_its_ids(
    path: Path, open_shared: Open
) -> None:
    running = {**plain("w2", "127.0.0.1:8002"), "job": {"job_id": 9, "state": "running"}}
    with SqliteStore(path) as single:
        single.commit(Batch(upserts={"w1": plain("w1", "127.0.0.1:8001"), "w2": running}))
        single.commit(Batch(deletes=["w1"], id_prefix="p-", id_high_water=1000))
    store = open_shared("a")
    state = store.load()
    assert (set(state.workers), state.change_seq, state.id_high_water) == ({"w2"}, 0, 1000)
    with pytest.raises(StoreError, match=r"refused the change.*UNIQUE.*worker_ids"):
        store.commit_after(new("w1", "127.0.0.1:8001"), 0)  # deleted by the single gateway
    # The job the single gateway started (and recorded nowhere) is left for anyone to claim.
    store.heartbeat()
    assert store.claim_jobs(10) == [("w2", 9)]


def test_the_first_replica_in_resets_the_records_of_replicas_long_gone(
    path: Path, open_shared: Open
) -> None:
    with SharedSqliteStore(path, replica="a") as old:
        old.heartbeat()
        old.hold_lease("health")
        old.commit_after(
            Batch(
                upserts={"w1": with_job("w1", "127.0.0.1:8001", 5, "running")},
                versions_before={"w1": None},
                started_jobs={"w1": 5},
            ),
            0,
        )
        old.record_idle("w1")
        assert jobs(path) == [("w1", 5, "a")]
    store = open_shared("b")  # nobody else in the file: nothing of the others still runs
    assert jobs(path) == [("w1", 5, "")]
    for table in ("replicas", "leases", "drain_idle"):
        assert query(path, f"SELECT count(*) FROM {table}") == [(0,)]
    assert store.hold_lease("health")
    joining = open_shared("c")  # others are in the file: it resets nothing
    assert joining.opened_version == SCHEMA_VERSION
    assert query(path, "SELECT replica FROM leases") == [("b",)]


# ---- numbered commits and Behind -----------------------------------------------------------


def test_commits_get_consecutive_numbers_and_a_stale_writer_gets_the_missing_changes(
    open_shared: Open,
) -> None:
    a, b = open_shared("a"), open_shared("b")
    assert a.commit_after(new("w1", "127.0.0.1:8001"), 0) == 1
    assert a.commit_after(new("w2", "127.0.0.1:8002", next_job_id=7), 1) == 2
    assert a.commit_after(Batch(deletes=["w1"]), 2) == 3

    stale = new("w3", "127.0.0.1:8003", id_high_water=50)
    with pytest.raises(Behind) as info:
        b.commit_after(stale, 1)
    assert info.value.changes == [
        Change(2, {"w2": plain("w2", "127.0.0.1:8002")}, [], 0, 7, "a"),
        Change(3, {}, ["w1"], 0, 0, "a"),
    ]
    state = b.load()
    assert (state.change_seq, state.id_high_water, set(state.workers)) == (3, 0, {"w2"})

    assert b.commit_after(stale, 3) == 4
    assert set(a.load().workers) == {"w2", "w3"}
    assert a.changes_since(3) == [Change(4, {"w3": plain("w3", "127.0.0.1:8003")}, [], 50, 0, "b")]


def test_an_empty_batch_only_checks_that_nothing_newer_exists(open_shared: Open) -> None:
    store = open_shared()
    assert store.commit_after(Batch(), 0) == 0
    store.commit_after(new("w1", "127.0.0.1:8001"), 0)
    assert store.commit_after(Batch(), 1) == 1
    with pytest.raises(Behind) as info:
        store.commit_after(Batch(), 0)
    assert [change.seq for change in info.value.changes] == [1]
    assert store.load().change_seq == 1


def test_the_single_writer_commit_goes_after_whatever_the_log_holds(open_shared: Open) -> None:
    a, b = open_shared("a"), open_shared("b")
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    b.commit(new("w2", "127.0.0.1:8002"))  # b never looked: commit finds the head itself
    assert [change.seq for change in a.changes_since(0)] == [1, 2]


def test_two_replicas_committing_at_once_get_every_number_once(open_shared: Open) -> None:
    per_thread = 50
    start_together = threading.Barrier(2, timeout=30)

    def writer(store: SharedSqliteStore) -> int:
        after = behind_count = 0
        for n in range(per_thread):
            batch = new(f"{store.replica}-{n}", f"{store.replica}.example:{8000 + n}")
            start_together.wait()  # both commit each round: one of them is always behind
            while True:
                try:
                    after = store.commit_after(batch, after)
                    break
                except Behind as behind:
                    after = behind.changes[-1].seq
                    behind_count += 1
        return behind_count

    stores = [open_shared("a"), open_shared("b")]
    with ThreadPoolExecutor(2) as pool:
        writers = [pool.submit(writer, store) for store in stores]
    assert sum(future.result() for future in writers) >= per_thread
    changes = stores[0].changes_since(0)
    assert [change.seq for change in changes] == list(range(1, 2 * per_thread + 1))
    ids = [worker_id for change in changes for worker_id in change.upserts]
    expected = {f"{replica}-{n}" for replica in "ab" for n in range(per_thread)}
    assert sorted(ids) == sorted(expected)
    for change in changes:
        assert all(worker_id.startswith(change.replica) for worker_id in change.upserts)
    assert set(stores[1].load().workers) == expected


def test_a_writer_that_cannot_get_the_write_lock_in_time_gets_a_store_error(
    path: Path, open_shared: Open
) -> None:
    store = open_shared(busy_timeout_secs=0.05)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"held the database longer than 0\.05 s"):
            store.commit_after(new("w1", "127.0.0.1:8001"), 0)
        other.execute("ROLLBACK")
    assert store.commit_after(new("w1", "127.0.0.1:8001"), 0) == 1


# ---- the constraints as backstop -----------------------------------------------------------


@pytest.mark.parametrize(
    "refused",
    [
        pytest.param(new("w9", "http://127.0.0.1:8000"), id="same-identity-key-as-new"),
        pytest.param(
            Batch(upserts={"w9": plain("w9", "http://127.0.0.1:8000")}), id="same-identity-key"
        ),
        pytest.param(new("w0", "127.0.0.1:8009"), id="reinserting-a-deleted-id"),
        pytest.param(
            Batch(upserts={"w1": plain("w1", "127.0.0.1:8001", 3)}, versions_before={"w1": 2}),
            id="stale-spec-version",
        ),
        pytest.param(
            Batch(upserts={"w7": plain("w7", "127.0.0.1:8007", 2)}, versions_before={"w7": 1}),
            id="updating-an-unstored-id",
        ),
        pytest.param(Batch(deletes=["ghost"]), id="deleting-an-unstored-id"),
    ],
)
def test_a_batch_breaking_an_invariant_is_refused_whole(
    path: Path, open_shared: Open, refused: Batch
) -> None:
    store = open_shared()
    store.commit_after(new("w0", "127.0.0.1:7999"), 0)
    store.commit_after(Batch(deletes=["w0"]), 1)
    store.commit_after(new("w1", "127.0.0.1:8000"), 2)
    before = store.load()
    # Something harmless rides along in the batch: it must not be stored either.
    batch = Batch(
        upserts={**refused.upserts, "ok": plain("ok", "127.0.0.1:9999")},
        deletes=refused.deletes,
        versions_before={**refused.versions_before, "ok": None},
        id_prefix="late-",
        id_high_water=5000,
        next_job_id=500,
        started_jobs={"ok": 1},
    )
    with pytest.raises(StoreError, match="refused the change") as info:
        store.commit_after(batch, 3)
    assert str(path) in str(info.value)
    assert store.load() == before  # no worker, no counter, no change number
    assert store.changes_since(3) == []
    assert jobs(path) == []
    assert store.commit_after(new("w2", "127.0.0.1:8002"), 3) == 4  # and it carries on


# ---- reading back ------------------------------------------------------------------------


def test_load_gives_the_workers_and_counters_only_ever_raised(open_shared: Open) -> None:
    a, b = open_shared("a"), open_shared("b")
    a.commit_after(new("w1", "127.0.0.1:8001", id_prefix="p-", id_high_water=1000), 0)
    b.commit_after(new("w2", "127.0.0.1:8002", id_prefix="q-", id_high_water=500), 1)
    b.commit_after(Batch(next_job_id=40), 2)
    a.commit_after(Batch(next_job_id=30, id_high_water=2000), 3)
    update = plain("w1", "127.0.0.1:8011", 2)
    b.commit_after(Batch(upserts={"w1": update}, versions_before={"w1": 1}), 4)
    state = a.load()
    assert state.workers == {"w1": update, "w2": plain("w2", "127.0.0.1:8002")}
    assert (state.id_prefix, state.id_high_water, state.next_job_id) == ("p-", 2000, 40)
    assert state.change_seq == 5
    assert [change.seq for change in a.changes_since(2)] == [3, 4, 5]
    assert a.changes_since(5) == []


def test_a_reader_behind_the_kept_log_gets_the_whole_registry(
    path: Path, open_shared: Open
) -> None:
    store = open_shared()
    for n in range(1, 5):
        store.commit_after(new(f"w{n}", f"127.0.0.1:{8000 + n}", next_job_id=n * 10), n - 1)
    store.commit_after(Batch(deletes=["w2"]), 4)
    execute(path, "DELETE FROM changes WHERE seq <= 2")  # as pruning does
    everything = Change(
        seq=5,
        upserts={f"w{n}": plain(f"w{n}", f"127.0.0.1:{8000 + n}") for n in (1, 3, 4)},
        next_job_id=40,
        full=True,
    )
    assert store.changes_since(0) == [everything]
    assert store.changes_since(1) == [everything]
    assert [change.seq for change in store.changes_since(2)] == [3, 4, 5]


def test_a_writer_behind_the_kept_log_gets_the_whole_registry_in_behind(
    path: Path, open_shared: Open
) -> None:
    store = open_shared()
    store.commit_after(new("w1", "127.0.0.1:8001"), 0)
    store.commit_after(new("w2", "127.0.0.1:8002"), 1)
    execute(path, "DELETE FROM changes WHERE seq <= 1")
    with pytest.raises(Behind) as info:
        store.commit_after(new("w3", "127.0.0.1:8003"), 0)
    [change] = info.value.changes
    assert (change.full, change.seq, set(change.upserts)) == (True, 2, {"w1", "w2"})


def test_the_log_is_pruned_to_the_changes_kept(
    path: Path, open_shared: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_module, "KEEP_CHANGES", 3)
    monkeypatch.setattr(shared_module, "PRUNE_EVERY", 2)
    store = open_shared()
    for n in range(1, 8):
        store.commit_after(new(f"w{n}", f"127.0.0.1:{8000 + n}"), n - 1)
    assert query(path, "SELECT seq FROM changes ORDER BY seq") == [(4,), (5,), (6,), (7,)]
    assert [change.full for change in store.changes_since(2)] == [True]
    assert [change.seq for change in store.changes_since(3)] == [4, 5, 6, 7]


# ---- replicas and drains -------------------------------------------------------------------


def test_a_drain_is_idle_once_every_live_replica_recorded_it(path: Path, open_shared: Open) -> None:
    a, b = open_shared("a", replica_lease_secs=5), open_shared("b", replica_lease_secs=5)
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    a.commit_after(new("w2", "127.0.0.1:8002"), 1)
    assert a.heartbeat() == ["a"]
    assert b.heartbeat() == ["a", "b"]
    assert a.record_idle("w1") is False
    assert a.record_idle("w1") is False  # recording twice changes nothing
    assert b.record_idle("w1") is True
    assert a.record_idle("w1") is True

    # b stops beating (its clock moved back, not waited for): past its lease it holds no drain.
    seen = "UPDATE replicas SET seen_at = seen_at - ? WHERE replica = 'b'"
    execute(path, seen, (6,))
    assert a.heartbeat() == ["a"]
    assert a.record_idle("w2") is True
    # Gone for ten leases, it is forgotten with what it recorded; back, it must record again.
    execute(path, seen, (60,))
    assert a.heartbeat() == ["a"]
    assert b.heartbeat() == ["a", "b"]
    assert a.record_idle("w1") is False
    assert b.record_idle("w1") is True


def test_a_drain_of_a_worker_that_is_gone_is_over_and_records_nothing(
    path: Path, open_shared: Open
) -> None:
    a, b = open_shared("a"), open_shared("b")
    a.heartbeat()
    b.heartbeat()
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    assert a.record_idle("w1") is False
    b.commit_after(Batch(deletes=["w1"]), 1)  # removed (by b, which never recorded)
    assert a.record_idle("w1") is True  # nothing left to wait for
    assert query(path, "SELECT * FROM drain_idle") == []


def test_a_deleted_worker_takes_its_drain_records_along(path: Path, open_shared: Open) -> None:
    store = open_shared()
    store.commit_after(new("w1", "127.0.0.1:8001"), 0)
    store.heartbeat()
    store.record_idle("w1")
    store.commit_after(Batch(deletes=["w1"]), 1)
    assert query(path, "SELECT * FROM drain_idle") == []


# ---- the feed ------------------------------------------------------------------------------


def test_wait_for_changes_wakes_on_another_replicas_commit_only(open_shared: Open) -> None:
    watcher, writer = open_shared("a"), open_shared("b")
    assert watcher.wait_for_changes(0.05) is True  # connected: something may have been missed
    assert watcher.wait_for_changes(0.05) is False  # nothing committed: the timeout
    writer.commit_after(new("w1", "127.0.0.1:8001"), 0)
    assert watcher.wait_for_changes(10) is True
    assert [change.seq for change in watcher.changes_since(0)] == [1]
    assert watcher.wait_for_changes(0.05) is False  # that change was reported once

    # Heartbeats, leases and claims commit too, but move no change number: no news.
    writer.heartbeat()
    writer.hold_lease("health")
    writer.claim_jobs(10)
    assert watcher.wait_for_changes(0.05) is False
    writer.commit_after(Batch(deletes=["w1"]), 1)
    assert watcher.wait_for_changes(10) is True


def test_wait_for_changes_sees_the_same_stores_commits_too(open_shared: Open) -> None:
    store = open_shared()
    assert store.wait_for_changes(0) is True
    store.commit_after(new("w1", "127.0.0.1:8001"), 0)  # another connection than the watcher's
    assert store.wait_for_changes(10) is True


def test_a_closed_store_refuses_calls_and_closes_again_quietly(open_shared: Open) -> None:
    store = open_shared()
    assert store.wait_for_changes(0.01) is True
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load()
    with pytest.raises(StoreError, match="closed"):
        store.commit_after(Batch(), 0)
    with pytest.raises(StoreError, match="closed"):  # it does not watch again either
        store.wait_for_changes(0.01)


def test_close_ends_a_wait_in_another_thread_and_closes_its_connection(
    open_shared: Open,
) -> None:
    store = open_shared()
    assert store.wait_for_changes(0) is True  # the watcher's connection is open
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(store.wait_for_changes(60))
        except StoreError as error:  # close() came first
            outcome.append(error)

    waiting = threading.Thread(target=wait)
    waiting.start()
    started = time.monotonic()
    store.close()
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert time.monotonic() - started < 5  # not the wait's 60 s
    [result] = outcome
    assert result is False or "closed" in str(result)
    assert store._watcher is None


# ---- work done once: job records and leases ------------------------------------------------


def jobs(path: Path) -> list[tuple[str, int, str]]:
    rows = query(path, "SELECT worker_id, job_id, replica FROM jobs ORDER BY 1")
    return [(worker_id, int(job_id), replica) for worker_id, job_id, replica in rows]


def with_job(worker_id: str, url: str, job_id: int, state: str) -> dict[str, Any]:
    return {**plain(worker_id, url), "job": {"job_id": job_id, "state": state}}


def test_a_started_job_is_recorded_under_its_replica_until_it_ends_or_its_worker_goes(
    path: Path, open_shared: Open
) -> None:
    store = open_shared("a")
    running = with_job("w1", "127.0.0.1:8001", 1, "running")
    other = with_job("w2", "127.0.0.1:8002", 2, "queued")
    store.commit_after(
        Batch(
            upserts={"w1": running, "w2": other},
            versions_before={"w1": None, "w2": None},
            started_jobs={"w1": 1, "w2": 2},
        ),
        0,
    )
    assert jobs(path) == [("w1", 1, "a"), ("w2", 2, "a")]
    done = with_job("w1", "127.0.0.1:8001", 1, "succeeded")
    store.commit_after(Batch(upserts={"w1": done}, versions_before={"w1": 1}), 1)
    store.commit_after(Batch(deletes=["w2"]), 2)
    assert jobs(path) == []


def test_the_jobs_of_a_replica_that_stopped_are_claimed_once_by_a_live_one(
    path: Path, open_shared: Open
) -> None:
    a, b, c = open_shared("a"), open_shared("b"), open_shared("c")
    for store in (a, b, c):
        store.heartbeat()
    batch = Batch(
        upserts={"w1": with_job("w1", "127.0.0.1:8001", 7, "running")},
        versions_before={"w1": None},
        started_jobs={"w1": 7},
    )
    a.commit_after(batch, 0)
    assert b.claim_jobs(10) == []  # a is alive
    execute(path, "UPDATE replicas SET seen_at = seen_at - 3600 WHERE replica = 'a'")
    assert b.claim_jobs(10) == [("w1", 7)]
    assert c.claim_jobs(10) == []  # b claimed it and b is alive
    assert jobs(path) == [("w1", 7, "b")]
    b.release_job("w1", 7)
    assert jobs(path) == []


def test_a_replica_that_joins_again_leaves_its_old_jobs_for_anyone(open_shared: Open) -> None:
    first = open_shared("a")
    first.heartbeat()
    first.commit_after(
        Batch(
            upserts={"w1": with_job("w1", "127.0.0.1:8001", 3, "running")},
            versions_before={"w1": None},
            started_jobs={"w1": 3},
        ),
        0,
    )
    again = open_shared("a")  # the same name after a restart: nothing of it runs any more
    again.join()
    other = open_shared("b")
    other.heartbeat()
    assert other.claim_jobs(10) == [("w1", 3)]


def test_a_lease_has_one_holder_until_it_runs_out(path: Path, open_shared: Open) -> None:
    a, b = open_shared("a"), open_shared("b")
    assert a.hold_lease("health")
    assert not b.hold_lease("health")
    assert a.hold_lease("health")  # renewed
    execute(path, "UPDATE leases SET until = ?", (time.clock_gettime(time.CLOCK_BOOTTIME) - 1,))
    assert b.hold_lease("health")
    assert not a.hold_lease("health")


# ---- open_store and the interface --------------------------------------------------------


def test_open_store_opens_a_file_shared_only_when_asked(path: Path) -> None:
    store = open_store(str(path), replica="x", replica_lease_secs=2.0, shared=True)
    try:
        assert isinstance(store, SharedSqliteStore)
        assert (store.replica, store.replica_lease_secs) == ("x", 2.0)
        assert is_shared(store)
        typed: SharedStore = store  # mypy checks that it is one
        assert typed.shared
    finally:
        store.close()
    single = open_store(str(path))
    try:
        assert type(single) is SqliteStore
        assert not is_shared(single)
    finally:
        single.close()
    assert not is_shared(MemoryStore())
    with pytest.raises(ValueError, match="cannot be shared"):
        open_store(":memory:", shared=True)


# ---- two processes -------------------------------------------------------------------------

# A child imports the store without the ``actors`` package's __init__ (which starts the whole
# gateway's imports): a bare package object pointing at the source folder, so it starts fast.
# Replica ``index`` 0 commits the odd change numbers, 1 the even ones: before each commit it
# waits until the other committed, then commits after the last change it knows, is told
# ``Behind`` with the other's change, takes it in and commits again.
REPLICA_CHILD = f"""
import json, sys, time, types
package = types.ModuleType("actors")
package.__path__ = [{str(ROOT / "actors")!r}]
sys.modules["actors"] = package
from actors.store import Batch, SharedSqliteStore
from actors.store.base import Behind

path, index, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
name = "ab"[index]
store = SharedSqliteStore(path, replica=name)
after, behind, seen = 0, 0, []


def take(changes):
    global after
    for change in changes:
        seen.extend(worker_id for worker_id in change.upserts if change.replica != name)
        after = change.seq


def wait_for_the_other():
    deadline = time.monotonic() + 60
    while not store.changes_since(after):
        if time.monotonic() > deadline:
            sys.exit(f"{{name}}: the other replica never committed after {{after}}")
        store.wait_for_changes(1.0)


for n in range(rounds):
    if index == 1 or n > 0:
        wait_for_the_other()
    worker_id = f"{{name}}{{n}}"
    url = f"10.0.{{index}}.{{n}}:8000"
    data = {{"id": worker_id, "spec": {{"url": url}}, "spec_version": 1}}
    batch = Batch(upserts={{worker_id: data}}, versions_before={{worker_id: None}})
    while True:
        try:
            after = store.commit_after(batch, after)
            break
        except Behind as error:
            behind += 1
            take(error.changes)
if index == 0:
    wait_for_the_other()
    take(store.changes_since(after))
workers = sorted(store.load().workers)
store.close()
print(json.dumps({{"behind": behind, "seen": seen, "after": after, "workers": workers}}))
"""


def test_two_replica_processes_commit_in_turn_and_see_each_others_changes(path: Path) -> None:
    rounds = 10
    SharedSqliteStore(path, replica="setup").close()  # created before: the children only join
    children = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA_CHILD, str(path), str(index), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 1)
    ]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        reports.append(json.loads(out))
    every = sorted(f"{name}{n}" for name in "ab" for n in range(rounds))
    a, b = reports
    assert (a["behind"], b["behind"]) == (rounds - 1, rounds)
    assert a["seen"] == [f"b{n}" for n in range(rounds)]
    assert b["seen"] == [f"a{n}" for n in range(rounds)]
    assert a["after"] == b["after"] == 2 * rounds
    assert a["workers"] == b["workers"] == every
    with SharedSqliteStore(path, replica="check") as store:
        changes = store.changes_since(0)
    assert [change.seq for change in changes] == list(range(1, 2 * rounds + 1))
    assert [change.replica for change in changes] == ["a", "b"] * rounds


def test_the_first_replica_in_keeps_a_failed_workers_scheduled_recheck_for_anyone(
    path: Path, open_shared: Open
) -> None:
    failed = {
        **with_job("w1", "127.0.0.1:8001", 4, "failed"),
        "status": "failed",
        "spec": {"url": "127.0.0.1:8001", "recheck_interval_secs": 30},
    }
    running = with_job("w1", "127.0.0.1:8001", 4, "running")
    with SharedSqliteStore(path, replica="a") as old:
        started = Batch(
            upserts={"w1": running}, versions_before={"w1": None}, started_jobs={"w1": 4}
        )
        old.commit_after(started, 0)
        old.commit_after(Batch(upserts={"w1": failed}, versions_before={"w1": 1}), 1)
        assert jobs(path) == [("w1", 4, "a")]  # its recheck is a's to run
    again = open_shared("b")  # every replica stopped and one came back
    assert jobs(path) == [("w1", 4, "")]  # left for anyone, not forgotten
    again.heartbeat()
    assert again.claim_jobs(10) == [("w1", 4)]


def test_a_commit_decided_inside_the_write_lock_sees_what_others_committed(
    open_shared: Open,
) -> None:
    a, b = open_shared("a"), open_shared("b")
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    a.commit_after(new("w2", "127.0.0.1:8002"), 1)
    seen: list[list[int]] = []

    def decide(missing: list[Change]) -> Batch:
        seen.append([change.seq for change in missing])
        return new("w3", "127.0.0.1:8003")

    assert b.commit_decided(0, decide) == 3
    assert seen == [[1, 2]]
    assert b.commit_decided(3, lambda missing: Batch()) == 3
    assert set(a.load().workers) == {"w1", "w2", "w3"}
