"""PostgresStore against a real PostgreSQL server: the schema, numbered commits and ``Behind``,
the constraints as backstop, the change feed, replicas and drains, and an outage
(actors/store/postgres.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from actors.store import Batch, MemoryStore, StoreError, open_store
from actors.store.base import Behind, Change, is_shared
from actors.store.postgres import PostgresStore, redact
from actors.store.postgres_schema import SCHEMA_VERSION
from scripts.postgres_server import PostgresServer

Open = Callable[..., PostgresStore]


def plain(worker_id: str, url: str = "127.0.0.1:8000", spec_version: int = 1) -> dict[str, Any]:
    return {"id": worker_id, "spec": {"url": url}, "spec_version": spec_version}


def new(worker_id: str, url: str, **counters: Any) -> Batch:
    """A batch that creates one worker (``versions_before`` says it is new)."""
    return Batch(
        upserts={worker_id: plain(worker_id, url)}, versions_before={worker_id: None}, **counters
    )


def execute(url: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Change the database behind the store's back."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


@pytest.fixture
def open_pg(postgres_url: str) -> Iterator[Open]:
    """``open_pg(replica="a", **options)``: a store on this test's database, closed at the end."""
    stores: list[PostgresStore] = []

    def open_one(replica: str = "a", **options: Any) -> PostgresStore:
        store = PostgresStore(postgres_url, replica=replica, **options)
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        store.close()


# ---- the schema --------------------------------------------------------------------------


def test_a_new_database_gets_the_schema_and_a_second_replica_reuses_it(open_pg: Open) -> None:
    first = open_pg("a")
    assert first.opened_version is None  # created now
    state = first.load()
    assert (state.workers, state.change_seq, state.schema_version) == ({}, 0, 1)
    assert (state.id_prefix, state.id_high_water, state.next_job_id) == (None, 0, 1)
    assert first.commit_after(new("w1", "127.0.0.1:8001", id_prefix="p-"), 0) == 1

    second = open_pg("b")
    assert second.opened_version == SCHEMA_VERSION  # found, not recreated
    state = second.load()
    assert state.workers == {"w1": plain("w1", "127.0.0.1:8001")}
    assert (state.change_seq, state.id_prefix) == (1, "p-")


def test_replicas_opening_a_new_database_at_once_create_the_schema_once(
    postgres_url: str,
) -> None:
    with ThreadPoolExecutor(4) as pool:
        opening = [pool.submit(PostgresStore, postgres_url, replica=f"r{n}") for n in range(4)]
    stores = [future.result() for future in opening if future.exception() is None]
    try:
        assert [future.exception() for future in opening] == [None] * 4
        assert sorted(store.opened_version or 0 for store in stores) == [0, 1, 1, 1]
    finally:
        for store in stores:
            store.close()


def test_a_newer_schema_is_refused_naming_its_version_and_no_connection_is_left_open(
    postgres_url: str, open_pg: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_pg("a")
    execute(postgres_url, "UPDATE tmg_meta SET schema_version = 99")
    opened: list[psycopg.Connection[Any]] = []  # held here, so no garbage collection closes them
    connect = psycopg.connect

    def spy(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(psycopg, "connect", spy)
    try:
        with pytest.raises(StoreError, match="schema version 99, newer than this gateway's 1"):
            PostgresStore(postgres_url, replica="b")
        assert [conn.closed for conn in opened] == [True]
    finally:
        for conn in opened:
            conn.close()


# ---- numbered commits and Behind -----------------------------------------------------------


def test_commits_get_consecutive_numbers_and_a_stale_writer_gets_the_missing_changes(
    open_pg: Open,
) -> None:
    a, b = open_pg("a"), open_pg("b")
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


def test_an_empty_batch_only_checks_that_nothing_newer_exists(open_pg: Open) -> None:
    store = open_pg()
    assert store.commit_after(Batch(), 0) == 0
    store.commit_after(new("w1", "127.0.0.1:8001"), 0)
    assert store.commit_after(Batch(), 1) == 1
    with pytest.raises(Behind) as info:
        store.commit_after(Batch(), 0)
    assert [change.seq for change in info.value.changes] == [1]
    assert store.load().change_seq == 1


def test_two_replicas_committing_at_once_get_every_number_once(open_pg: Open) -> None:
    per_thread = 50

    def writer(store: PostgresStore) -> int:
        after = behind_count = 0
        for n in range(per_thread):
            batch = new(f"{store.replica}-{n}", f"{store.replica}.example:{8000 + n}")
            while True:
                try:
                    after = store.commit_after(batch, after)
                    break
                except Behind as behind:
                    after = behind.changes[-1].seq
                    behind_count += 1
        return behind_count

    stores = [open_pg("a"), open_pg("b")]
    with ThreadPoolExecutor(2) as pool:
        writers = [pool.submit(writer, store) for store in stores]
    assert sum(future.result() for future in writers) >= 1  # they did get in each other's way
    changes = stores[0].changes_since(0)
    assert [change.seq for change in changes] == list(range(1, 2 * per_thread + 1))
    ids = [worker_id for change in changes for worker_id in change.upserts]
    expected = {f"{replica}-{n}" for replica in "ab" for n in range(per_thread)}
    assert sorted(ids) == sorted(expected)
    for change in changes:
        assert all(worker_id.startswith(change.replica) for worker_id in change.upserts)
    assert set(stores[1].load().workers) == expected


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
def test_a_batch_breaking_an_invariant_is_refused_whole(open_pg: Open, refused: Batch) -> None:
    store = open_pg()
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
    )
    with pytest.raises(StoreError, match="refused the change") as info:
        store.commit_after(batch, 3)
    assert store.name in str(info.value)
    assert store.load() == before  # no worker, no counter, no change number
    assert store.changes_since(3) == []
    assert store.commit_after(new("w2", "127.0.0.1:8002"), 3) == 4  # and it carries on


# ---- reading back ------------------------------------------------------------------------


def test_load_gives_the_workers_and_counters_only_ever_raised(open_pg: Open) -> None:
    a, b = open_pg("a"), open_pg("b")
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
    postgres_url: str, open_pg: Open
) -> None:
    store = open_pg()
    for n in range(1, 5):
        store.commit_after(new(f"w{n}", f"127.0.0.1:{8000 + n}", next_job_id=n * 10), n - 1)
    store.commit_after(Batch(deletes=["w2"]), 4)
    execute(postgres_url, "DELETE FROM tmg_changes WHERE seq <= 2")  # as pruning does
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
    postgres_url: str, open_pg: Open
) -> None:
    store = open_pg()
    store.commit_after(new("w1", "127.0.0.1:8001"), 0)
    store.commit_after(new("w2", "127.0.0.1:8002"), 1)
    execute(postgres_url, "DELETE FROM tmg_changes WHERE seq <= 1")
    with pytest.raises(Behind) as info:
        store.commit_after(new("w3", "127.0.0.1:8003"), 0)
    [change] = info.value.changes
    assert (change.full, change.seq, set(change.upserts)) == (True, 2, {"w1", "w2"})


# ---- replicas and drains -------------------------------------------------------------------


def test_a_drain_is_idle_once_every_live_replica_recorded_it(
    postgres_url: str, open_pg: Open
) -> None:
    a, b = open_pg("a", replica_lease_secs=5), open_pg("b", replica_lease_secs=5)
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    a.commit_after(new("w2", "127.0.0.1:8002"), 1)
    assert a.heartbeat() == ["a"]
    assert b.heartbeat() == ["a", "b"]
    assert a.record_idle("w1") is False
    assert a.record_idle("w1") is False  # recording twice changes nothing
    assert b.record_idle("w1") is True
    assert a.record_idle("w1") is True

    # b stops beating (its clock moved back, not waited for): past its lease it holds no drain.
    seen = "UPDATE tmg_replicas SET seen_at = now() - %s::interval WHERE replica = 'b'"
    execute(postgres_url, seen, ("6 seconds",))
    assert a.heartbeat() == ["a"]
    assert a.record_idle("w2") is True
    # Gone for ten leases, it is forgotten with what it recorded; back, it must record again.
    execute(postgres_url, seen, ("1 minute",))
    assert a.heartbeat() == ["a"]
    assert b.heartbeat() == ["a", "b"]
    assert a.record_idle("w1") is False
    assert b.record_idle("w1") is True


def test_a_drain_of_a_worker_that_is_gone_is_over_and_records_nothing(
    postgres_url: str, open_pg: Open
) -> None:
    a, b = open_pg("a"), open_pg("b")
    a.heartbeat()
    b.heartbeat()
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    assert a.record_idle("w1") is False
    b.commit_after(Batch(deletes=["w1"]), 1)  # removed (by b, which never recorded)
    assert a.record_idle("w1") is True  # nothing left to wait for
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM tmg_drain_idle").fetchone() == (0,)


# ---- the feed ------------------------------------------------------------------------------


def test_wait_for_changes_wakes_on_another_replicas_commit(open_pg: Open) -> None:
    watcher, writer = open_pg("a"), open_pg("b")
    assert watcher.wait_for_changes(0.05) is True  # connected: something may have been missed
    assert watcher.wait_for_changes(0.05) is False  # nothing committed: the timeout
    writer.commit_after(new("w1", "127.0.0.1:8001"), 0)
    assert watcher.wait_for_changes(10) is True
    assert [change.seq for change in watcher.changes_since(0)] == [1]


# ---- failures ------------------------------------------------------------------------------


def test_while_postgres_is_down_calls_fail_without_the_password_and_then_recover() -> None:
    with PostgresServer() as server:
        url = server.create_database().replace("tmg@", "tmg:secret@")  # trust ignores it
        store = PostgresStore(url, replica="a", connect_timeout_secs=2)
        try:
            assert store.commit_after(new("w1", "127.0.0.1:8001"), 0) == 1
            assert store.wait_for_changes(0.01) is True
            server.stop()
            failures: list[Callable[[], object]] = [
                store.load,  # on the connection the server dropped
                store.load,  # reconnecting, refused
                lambda: store.commit_after(new("w2", "127.0.0.1:8002"), 1),
                lambda: store.changes_since(0),
                lambda: store.wait_for_changes(0.01),
            ]
            for call in failures:
                with pytest.raises(StoreError) as info:
                    call()
                assert "secret" not in str(info.value)
                assert "tmg:***@127.0.0.1" in str(info.value)
            server.start()
            assert store.load().workers == {"w1": plain("w1", "127.0.0.1:8001")}
            assert store.commit_after(new("w2", "127.0.0.1:8002"), 1) == 2
            assert store.wait_for_changes(0.01) is True  # the listener reconnected too
        finally:
            store.close()


def test_a_closed_store_refuses_calls_and_closes_again_quietly(open_pg: Open) -> None:
    store = open_pg()
    assert store.wait_for_changes(0.01) is True
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load()
    with pytest.raises(StoreError, match="closed"):  # it does not listen again either
        store.wait_for_changes(0.01)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tmg:secret@db.example:5432/x", "postgresql://tmg:***@db.example:5432/x"),
        ("postgres://u:p%40ss@[::1]/x?sslmode=off", "postgres://u:***@[::1]/x?sslmode=off"),
        ("postgresql://tmg@db.example/x", "postgresql://tmg@db.example/x"),
        (
            "postgresql://db.example/x?user=tmg&password=secret",
            "postgresql://db.example/x?user=tmg&password=***",
        ),
    ],
)
def test_redact_hides_the_password_in_a_url(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_open_store_opens_a_shared_postgres_store_for_a_url(postgres_url: str) -> None:
    store = open_store(postgres_url, replica="x")
    try:
        assert isinstance(store, PostgresStore)
        assert store.replica == "x"
        assert is_shared(store)
    finally:
        store.close()
    assert not is_shared(MemoryStore())


# ---- work done once: job records and leases ------------------------------------------------


def jobs(url: str) -> list[tuple[str, int, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT worker_id, job_id, replica FROM tmg_jobs ORDER BY 1").fetchall()
    return [(worker_id, int(job_id), replica) for worker_id, job_id, replica in rows]


def with_job(worker_id: str, url: str, job_id: int, state: str) -> dict[str, Any]:
    return {**plain(worker_id, url), "job": {"job_id": job_id, "state": state}}


def test_a_started_job_is_recorded_under_its_replica_until_it_ends_or_its_worker_goes(
    postgres_url: str, open_pg: Open
) -> None:
    store = open_pg("a")
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
    assert jobs(postgres_url) == [("w1", 1, "a"), ("w2", 2, "a")]
    done = with_job("w1", "127.0.0.1:8001", 1, "succeeded")
    store.commit_after(Batch(upserts={"w1": done}, versions_before={"w1": 1}), 1)
    store.commit_after(Batch(deletes=["w2"]), 2)
    assert jobs(postgres_url) == []


def test_the_jobs_of_a_replica_that_stopped_are_claimed_once_by_a_live_one(
    postgres_url: str, open_pg: Open
) -> None:
    a, b, c = open_pg("a"), open_pg("b"), open_pg("c")
    for store in (a, b, c):
        store.heartbeat()
    batch = Batch(
        upserts={"w1": with_job("w1", "127.0.0.1:8001", 7, "running")},
        versions_before={"w1": None},
        started_jobs={"w1": 7},
    )
    a.commit_after(batch, 0)
    assert b.claim_jobs(10) == []  # a is alive
    gone = "UPDATE tmg_replicas SET seen_at = now() - interval '1 hour' WHERE replica = 'a'"
    execute(postgres_url, gone)
    assert b.claim_jobs(10) == [("w1", 7)]
    assert c.claim_jobs(10) == []  # b claimed it and b is alive
    assert jobs(postgres_url) == [("w1", 7, "b")]
    b.release_job("w1", 7)
    assert jobs(postgres_url) == []


def test_a_replica_that_joins_again_leaves_its_old_jobs_for_anyone(
    postgres_url: str, open_pg: Open
) -> None:
    first = open_pg("a")
    first.heartbeat()
    first.commit_after(
        Batch(
            upserts={"w1": with_job("w1", "127.0.0.1:8001", 3, "running")},
            versions_before={"w1": None},
            started_jobs={"w1": 3},
        ),
        0,
    )
    again = open_pg("a")  # the same name after a restart: nothing of it runs any more
    again.join()
    other = open_pg("b")
    other.heartbeat()
    assert other.claim_jobs(10) == [("w1", 3)]


def test_a_lease_has_one_holder_until_it_runs_out(postgres_url: str, open_pg: Open) -> None:
    a, b = open_pg("a"), open_pg("b")
    assert a.hold_lease("health")
    assert not b.hold_lease("health")
    assert a.hold_lease("health")  # renewed
    execute(postgres_url, "UPDATE tmg_leases SET until = now() - interval '1 second'")
    assert b.hold_lease("health")
    assert not a.hold_lease("health")


def test_a_commit_decided_inside_the_lock_sees_what_others_committed_and_is_never_behind(
    open_pg: Open,
) -> None:
    a, b = open_pg("a"), open_pg("b")
    a.commit_after(new("w1", "127.0.0.1:8001"), 0)
    a.commit_after(new("w2", "127.0.0.1:8002"), 1)
    seen: list[list[int]] = []

    def decide(missing: list[Change]) -> Batch:
        seen.append([change.seq for change in missing])
        return new("w3", "127.0.0.1:8003")

    assert b.commit_decided(0, decide) == 3  # b had seen nothing: it is told of 1 and 2 first
    assert seen == [[1, 2]]
    assert b.commit_decided(3, lambda missing: Batch()) == 3  # nothing to write: the head
    assert set(a.load().workers) == {"w1", "w2", "w3"}


def test_commits_decided_inside_the_lock_from_two_threads_all_land_in_order(
    open_pg: Open,
) -> None:
    stores = [open_pg("a"), open_pg("b")]

    def writer(store: PostgresStore, prefix: str) -> None:
        seen = 0
        for n in range(25):

            def decide(missing: list[Change], n: int = n) -> Batch:
                return new(f"{prefix}{n}", f"127.0.0.1:{(1000 if prefix == 'a' else 2000) + n}")

            seen = store.commit_decided(seen, decide)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(writer, stores[0], "a"), pool.submit(writer, stores[1], "b")]
        for future in running:
            future.result()
    assert [change.seq for change in stores[0].changes_since(0)] == list(range(1, 51))
    assert len(stores[0].load().workers) == 50
