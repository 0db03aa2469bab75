"""SqliteStore on real files: the write path, durability under kill -9, versioning, refusals and
the lock (actors/store/sqlite.py, actors/store/lock.py)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from actors.store import Batch, SqliteStore, StoreError, StoreInUse, sqlite_schema
from actors.store.sqlite_schema import APPLICATION_ID, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent

# The batches the crash test's child commits; also run here to know what each number means.
BATCHES = """
def crash_batch(number):
    upserts = {
        f"w{number}": {
            "id": f"w{number}",
            "spec": {"url": f"http://10.0.{number // 250}.{number % 250}:8000"},
            "spec_version": 1,
            "n": number,
        }
    }
    if number > 1:
        previous = number - 1
        upserts[f"w{previous}"] = {
            "id": f"w{previous}",
            "spec": {"url": f"http://10.0.{previous // 250}.{previous % 250}:8000"},
            "spec_version": 2,
            "n": previous,
        }
    return Batch(
        upserts=upserts,
        deletes=[f"w{number - 3}"] if number > 3 else [],
        id_prefix="crash-" if number == 1 else None,
        id_high_water=10 * number,
        next_job_id=number + 1,
    )
"""
namespace: dict[str, Any] = {"Batch": Batch}
exec(BATCHES, namespace)
crash_batch: Callable[[int], Batch] = namespace["crash_batch"]

# A child imports the store without the ``actors`` package's __init__ (which starts the whole
# gateway's imports): a bare package object pointing at the source folder, so it starts fast.
CHILD_PRELUDE = f"""
import sys, types
package = types.ModuleType("actors")
package.__path__ = [{str(ROOT / "actors")!r}]
sys.modules["actors"] = package
from actors.store import Batch, SqliteStore
"""
CRASH_CHILD = (
    CHILD_PRELUDE
    + BATCHES
    + """
store = SqliteStore(sys.argv[1])
for number in range(1, int(sys.argv[2]) + 1):
    store.commit(crash_batch(number))
    print(number, flush=True)
"""
)
HOLDER_CHILD = (
    CHILD_PRELUDE
    + """
store = SqliteStore(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""
)


def plain(number: int, spec_version: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"w{number}",
        "spec": {"url": f"http://10.1.{number // 250}.{number % 250}:8000", "labels": {}},
        "spec_version": spec_version,
        **extra,
    }


def expected_after(count: int) -> dict[str, Any]:
    workers: dict[str, Any] = {}
    for number in range(1, count + 1):
        batch = crash_batch(number)
        for worker_id in batch.deletes:
            workers.pop(worker_id, None)
        workers.update(batch.upserts)
    return workers


def fill(path: Path, count: int) -> None:
    with SqliteStore(path) as store:
        store.commit(
            Batch(
                upserts={f"w{n}": plain(n, pad="x" * 500) for n in range(count)},
                id_prefix="p-",
                id_high_water=1000,
                next_job_id=50,
            )
        )


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def assert_refused(path: Path, match: str) -> StoreError:
    before = file_state(path)
    with pytest.raises(StoreError, match=match) as info:
        SqliteStore(path)
    assert file_state(path) == before, "a refused file was written"
    assert str(path) in str(info.value)
    with pytest.raises(StoreError, match=match):  # the refusal released the lock again
        SqliteStore(path)
    return info.value


# ---- the write path ----------------------------------------------------------------------


def test_a_sequence_of_batches_loads_as_exactly_the_final_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        assert store.load().workers == {}
        store.commit(Batch(upserts={"w1": plain(1), "w2": plain(2), "w3": plain(3)}))
        store.commit(Batch(upserts={"w2": plain(2, spec_version=2, note="updated")}))
        # w1 leaves and its address comes back under a new id in the same batch
        store.commit(
            Batch(upserts={"w9": {**plain(1), "id": "w9"}}, deletes=["w1", "w-never-stored"])
        )
        final = {"w2": plain(2, 2, note="updated"), "w3": plain(3), "w9": {**plain(1), "id": "w9"}}
        assert store.load().workers == final
    with SqliteStore(path) as store:
        state = store.load()
    assert state.workers == final
    assert state.schema_version == SCHEMA_VERSION
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        columns = conn.execute("SELECT id, identity_key, spec_version FROM workers ORDER BY id")
        assert columns.fetchall() == [
            ("w2", "10.1.0.2:8000", 2),
            ("w3", "10.1.0.3:8000", 1),
            ("w9", "10.1.0.1:8000", 1),
        ]


def test_a_real_worker_comes_back_equal_through_the_codec(tmp_path: Path) -> None:
    from actors import worker_spec
    from actors.core.codec import worker_from_plain, worker_to_plain
    from actors.core.model import JobState, JobStatus, JobType, Worker

    worker = Worker.pending(
        id="a-1",
        spec=worker_spec("http://127.0.0.1:8000", labels={"zone": "é"}, api_key="k", priority=7),
        job=JobStatus(job_id=3, job_type=JobType.ADD, state=JobState.QUEUED),
        now=1.5,
    )
    with SqliteStore(tmp_path / "state.db") as store:
        store.commit(Batch(upserts={worker.id: worker_to_plain(worker)}))
    with SqliteStore(tmp_path / "state.db") as store:
        [restored] = store.load().workers.values()
    assert worker_from_plain(restored) == worker


def test_a_changed_identity_key_is_rewritten(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        store.commit(Batch(upserts={"w1": plain(1), "w2": plain(2)}))
        moved = {**plain(1, 2), "spec": {"url": "http://10.9.9.9:8000"}}
        store.commit(Batch(upserts={"w1": moved, "w2": plain(2, 3)}))
        assert store.load().workers == {"w1": moved, "w2": plain(2, 3)}
        keys = store._require_open().execute("SELECT id, identity_key FROM workers ORDER BY id")
        assert keys.fetchall() == [("w1", "10.9.9.9:8000"), ("w2", "10.1.0.2:8000")]


def test_every_id_ever_stored_is_kept_though_its_worker_is_deleted(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        store.commit(Batch(upserts={"w1": plain(1), "w2": plain(2)}))
        store.commit(Batch(upserts={"w1": plain(1, 2)}, deletes=["w2"]))
        conn = store._require_open()
        assert conn.execute("SELECT id FROM worker_ids ORDER BY id").fetchall() == [
            ("w1",),
            ("w2",),
        ]
        assert store.load().change_seq == 0  # one gateway numbers no changes


def test_only_the_changed_rows_are_written(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        store.commit(
            Batch(
                upserts={f"w{n}": plain(n) for n in range(100)},
                id_prefix="p-",
                id_high_water=1000,
                next_job_id=1000,
            )
        )
        before = store.total_changes
        store.commit(Batch(upserts={"w5": plain(5, 2)}))
        assert store.total_changes - before == 1
        before = store.total_changes
        # counters inside the reservation are not written again
        store.commit(
            Batch(
                upserts={"w6": plain(6, 2), "w7": plain(7, 2)},
                deletes=["w8"],
                id_prefix="p-",
                id_high_water=1000,
                next_job_id=1000,
            )
        )
        assert store.total_changes - before == 3
        wal = Path(f"{store.path}-wal")
        before, wal_size = store.total_changes, wal.stat().st_size
        store.commit(Batch())  # every command of the batch was refused: no transaction at all
        store.commit(Batch(id_high_water=1000))
        assert (store.total_changes, wal.stat().st_size) == (before, wal_size)
        store.commit(Batch(id_high_water=2000))
        assert store.total_changes - before == 1


def test_the_id_source_and_job_counters_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        fresh = store.load()
        assert (fresh.id_prefix, fresh.id_high_water, fresh.next_job_id) == (None, 0, 1)
        store.commit(Batch(id_prefix="1f2e3d4c-aaaa-4bbb-8ccc-", id_high_water=1000))
        store.commit(Batch(id_high_water=2000, next_job_id=1001))
    with SqliteStore(path) as store:
        state = store.load()
        assert (state.id_prefix, state.id_high_water, state.next_job_id) == (
            "1f2e3d4c-aaaa-4bbb-8ccc-",
            2000,
            1001,
        )
        with pytest.raises(ValueError, match="move back"):
            store.commit(Batch(id_high_water=1999))
        with pytest.raises(ValueError, match="move back"):
            store.commit(Batch(next_job_id=5))
        with pytest.raises(ValueError, match="prefix"):
            store.commit(Batch(id_prefix="other-"))


def test_an_id_high_water_mark_needs_its_prefix(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store, pytest.raises(ValueError, match="prefix"):
        store.commit(Batch(id_high_water=1000))


def test_a_commit_that_fails_midway_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    fill(path, 10)
    with SqliteStore(path) as store:
        # a duplicate address: the second row trips the UNIQUE key after the first was written
        clash = {**plain(50), "id": "w51"}
        with pytest.raises(StoreError, match=r"rolled back.*UNIQUE"):
            store.commit(Batch(upserts={"w50": plain(50), "w51": clash}, deletes=["w1"]))

        def fail_after_rows(*args: object) -> None:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(SqliteStore, "_write_meta", staticmethod(fail_after_rows))
        with pytest.raises(RuntimeError, match="disk on fire"):
            store.commit(Batch(upserts={"w60": plain(60)}, deletes=["w2"], next_job_id=99))
        monkeypatch.undo()
        store.commit(Batch(upserts={"w70": plain(70)}))  # the store carries on
    with SqliteStore(path) as store:
        state = store.load()
    assert sorted(state.workers) == sorted([f"w{n}" for n in range(10)] + ["w70"])
    assert state.next_job_id == 50


def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.commit(Batch())


def test_full_synchronous_mode_is_available(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db", synchronous="full") as store:
        store.commit(Batch(upserts={"w1": plain(1)}))
        assert store._require_open().execute("PRAGMA synchronous").fetchone() == (2,)
    with pytest.raises(ValueError):
        SqliteStore(tmp_path / "other.db", synchronous="off")  # type: ignore[arg-type]


# ---- kill -9 -----------------------------------------------------------------------------


def test_every_batch_a_killed_process_reported_committed_is_recovered(tmp_path: Path) -> None:
    total = 300
    for seed in range(20):
        path = tmp_path / f"state-{seed}.db"
        target = random.Random(seed).randint(0, total)
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(path), str(total)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        read = 0
        while read < target and child.stdout.readline():
            read += 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        printed = [int(line) for line in child.stdout.read().split()]
        child.stdout.close()
        last = printed[-1] if printed else read
        with SqliteStore(path) as store:  # the dead child's lock does not block
            state = store.load()
        # everything it printed is there; at most one more batch committed unprinted
        committed = last if state.workers == expected_after(last) else last + 1
        assert state.workers == expected_after(committed), f"seed {seed}, printed {last}"
        if committed:
            assert (state.id_prefix, state.id_high_water) == ("crash-", 10 * committed)
            assert state.next_job_id == committed + 1


# ---- versioning --------------------------------------------------------------------------


def test_a_new_file_is_marked_as_ours_and_left_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        assert store.opened_version is None
        assert Path(f"{path}.lock").read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.db", "state.db.lock"]
    assert Path(f"{path}.lock").read_text() == ""
    assert path.stat().st_mode & 0o777 == 0o600  # it holds worker api_keys
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        pragmas = [
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("application_id", "user_version", "journal_mode")
        ]
    assert pragmas == [APPLICATION_ID, SCHEMA_VERSION, "wal"]


def make_version_0(path: Path) -> None:
    """The prototype layout: no spec_version column, no schema_version in meta."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE workers (id TEXT PRIMARY KEY, identity_key TEXT NOT NULL UNIQUE, "
        "data TEXT NOT NULL)"
    )
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for number, version in ((1, 4), (2, 1)):
        worker = plain(number, version)
        conn.execute(
            "INSERT INTO workers VALUES (?, ?, ?)",
            (worker["id"], f"10.1.0.{number}:8000", json.dumps(worker)),
        )
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("id_prefix", "old-"), ("id_high_water", 3000), ("next_job_id", 70)],
    )
    conn.close()


def columns(path: Path) -> tuple[int, list[str]]:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        names = [row[1] for row in conn.execute("PRAGMA table_info(workers)")]
        return conn.execute("PRAGMA user_version").fetchone()[0], names


def test_a_version_0_file_is_migrated_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_version_0(path)
    with SqliteStore(path) as store:
        assert store.opened_version == 0
        state = store.load()
    assert state.workers == {"w1": plain(1, 4), "w2": plain(2, 1)}
    assert (state.id_prefix, state.id_high_water, state.next_job_id) == ("old-", 3000, 70)
    assert columns(path) == (SCHEMA_VERSION, ["id", "identity_key", "data", "spec_version"])
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        assert conn.execute("SELECT id, spec_version FROM workers ORDER BY id").fetchall() == [
            ("w1", 4),
            ("w2", 1),
        ]
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            SCHEMA_VERSION,
        )
        assert conn.execute("SELECT id FROM worker_ids ORDER BY id").fetchall() == [
            ("w1",),
            ("w2",),
        ]
    with SqliteStore(path) as store:
        assert store.opened_version == SCHEMA_VERSION


def test_a_migration_that_fails_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    make_version_0(path)

    def half_then_fail(conn: sqlite3.Connection) -> None:
        sqlite_schema._v0_to_v1(conn)
        raise RuntimeError("step failed")

    monkeypatch.setitem(sqlite_schema.MIGRATIONS, 0, half_then_fail)
    with pytest.raises(StoreError, match=r"migration from schema version 0.*rolled back"):
        SqliteStore(path)
    assert columns(path) == (0, ["id", "identity_key", "data"])
    monkeypatch.undo()
    with SqliteStore(path) as store:
        assert len(store.load().workers) == 2


# ---- refusals ----------------------------------------------------------------------------


def test_a_newer_schema_version_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    fill(path, 3)
    newer = SCHEMA_VERSION + 1
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    error = assert_refused(
        path, f"schema version {newer}, newer than this gateway's {SCHEMA_VERSION}"
    )
    assert error.path == str(path)


def test_a_database_of_another_application_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE workers (x)")
    assert_refused(path, r"another application \(application_id 0x0, expected 0x544d4753\)")


def test_a_file_that_is_not_sqlite_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_text('{"workers": []}\n' * 20)
    assert_refused(path, "not an SQLite database")


def test_an_empty_file_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch()
    assert_refused(path, "is empty")


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        (0.5, "truncated: its header says"),
        (0.5, "truncated: .* not a whole number"),
        (60 / 1e9, "truncated: 60 bytes"),
    ],
)
def test_a_truncated_file_is_refused_unchanged(tmp_path: Path, keep: float, match: str) -> None:
    path = tmp_path / "state.db"
    fill(path, 200)
    size = path.stat().st_size
    cut = max(60, int(size * keep) // 4096 * 4096)
    if "whole number" in match:
        cut += 1000
    with open(path, "r+b") as file:
        file.truncate(cut)
    assert_refused(path, match)


def test_a_corrupt_file_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    fill(path, 200)
    with open(path, "r+b") as file:
        file.seek(2 * 4096)
        file.write(random.Random(1).randbytes(4096))
    assert_refused(path, "corrupt")


def test_a_file_in_use_by_this_process_is_refused_naming_the_pid(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        store.commit(Batch(upserts={"w1": plain(1)}))
        with pytest.raises(StoreInUse) as info:
            SqliteStore(path)
        assert info.value.holder_pid == os.getpid()
        assert f"state file {path}: in use by another gateway (pid {os.getpid()}" in str(info.value)


def test_a_file_in_use_by_another_process_is_refused_until_it_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    fill(path, 5)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        before = file_state(path)
        with pytest.raises(StoreInUse, match=f"pid {holder.pid}") as info:
            SqliteStore(path)
        assert info.value.holder_pid == holder.pid and str(path) in str(info.value)
        assert file_state(path) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()
    assert Path(f"{path}.lock").read_text() == f"{holder.pid}\n"  # stale, and harmless:
    with SqliteStore(path) as store:
        assert len(store.load().workers) == 5


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "state.db"
    expected = f"its directory {tmp_path / 'nowhere'} does not exist"
    with pytest.raises(StoreError, match=re.escape(expected)):
        SqliteStore(path)
    assert not (tmp_path / "nowhere").exists()


def test_a_wal_left_without_its_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Path(f"{path}-wal").write_bytes(b"stale")
    with pytest.raises(StoreError, match=r"state\.db-wal does"):
        SqliteStore(path)
    assert not path.exists()
