"""SharedSqliteStore: one SQLite file shared by several gateway processes on one host, each a
replica (``tmg serve --processes N --state FILE``). It is the ``SharedStore`` of
``actors/store/base.py`` with the semantics of ``actors/store/postgres.py``, on the stdlib
``sqlite3`` (blocking; imports no trio).

The file, its format, its inspection, creation and migration are ``SqliteStore``'s
(``actors/store/sqlite.py``, whose layout lists the tables used here); this module adds what
replicas need.

**Opening.** ``StateLock`` in its shared mode (``actors/store/lock.py``): any number of replicas
hold ``PATH.lock`` at once; a single gateway (``SqliteStore``) and replicas exclude each other.
The first replica in (``alone``: no other gateway has the file) inspects, creates or migrates it
as a single gateway would, and then resets the replicas' records, since nothing runs anywhere:
no replica is alive, no lease held, no drain recorded, and every active job of a stored worker
is recorded under no replica (``jobs``), for anyone to claim and run again. That also covers the
jobs a single gateway started (it records none) when the file passes from one gateway to
replicas. A replica coming later finds the file in use and set up: it only checks the
application id, version and tables through SQLite (the raw inspection of the file would race
the others' writes).

**One writer at a time, in commit order.** A commit is one ``BEGIN IMMEDIATE … COMMIT``.
``BEGIN IMMEDIATE`` takes SQLite's write lock at once, across all processes (WAL readers never
wait for it), so no other replica commits between its first statement and its ``COMMIT``. The
first statement reads the head change number (``meta.change_seq``). If it is not ``after``,
another replica committed since this one last looked: the transaction ends having written
nothing and ``Behind`` carries the missing changes (read afterwards, in a read transaction of
their own); the registry applies them and decides its batch again. Else the batch is written,
with its change row numbered head + 1 and the head moved to it. So the numbers have no gaps
and follow commit order: nobody commits between the read of the head and the commit, and a
transaction rolled back leaves the head as it was. A reader that has applied change N and reads
``seq > N`` can never skip a change that commits late. A replica that does not get the write
lock within ``busy_timeout_secs`` (another holding it that long: a hung disk) gets
``StoreError`` (503), as for any other failure; nothing of the batch is stored.

**Constraints as the backstop**, as in PostgreSQL: the unique identity key, a compare-and-set
on ``spec_version`` for every updated worker (``Batch.versions_before``), ``worker_ids`` (a new
worker's id is inserted there first, and refused if it was ever stored) and a checked row count
for every delete hold the invariants even against a writer whose table is wrong; such a refusal
rolls the batch back and becomes ``StoreError`` (503), never a half-written batch.

**The feed.** Each commit writes its batch to ``changes`` under its number. The log keeps the
last ``KEEP_CHANGES`` changes; a replica further behind gets the whole registry as one
``Change(full=True)``. SQLite has no notifications, so ``wait_for_changes`` polls, on its own
connection (it runs in another thread than the writer's calls; a lock keeps ``close`` from
closing that connection under it): ``PRAGMA data_version`` (it reads the WAL index in shared
memory, microseconds), which moves whenever another connection committed anything. It looks
every ``poll_secs`` (5 ms) after news, and less often while nothing happens, doubling up to
``max_poll_secs`` (50 ms): a look costs little, but 200 a second cost an idle gateway process
about 7 % of a core here (py-spy under load at ``--processes 2``); at 20 a second the first
change after a quiet spell is seen within 50 ms, and the ones after it within 5 ms. When the
version moved, the head is read, and only a moved head is news: the replicas' heartbeats,
claims and leases commit too (every second or so each), and are none of the registry's
business.

**Replicas, drains, jobs, leases**: as in PostgreSQL (see there), with ``CLOCK_BOOTTIME`` as
the clock (seconds in REAL columns; the replicas share one host, so one clock, which nobody
sets). Every write is a ``BEGIN IMMEDIATE`` transaction: one writer at a time, so
``claim_jobs`` gives a job to one replica only without row locks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from actors.store.base import (
    Batch,
    Behind,
    Change,
    StoreError,
    change_from_payload,
    change_payload,
    identity_key,
    owns_work,
    validate_batch,
)
from actors.store.sqlite import SqliteStore, Synchronous
from actors.store.sqlite_replicas import SqliteReplicas
from actors.store.sqlite_schema import SCHEMA_VERSION

KEEP_CHANGES = 10_000  # changes kept in the log; a replica further behind reloads everything
PRUNE_EVERY = 1000  # every this many changes, the log is cut back to KEEP_CHANGES
WATCHER_CLOSE_WAIT_SECS = 5.0  # close() waits this long for a wait_for_changes to end

_INSERT = "INSERT INTO workers (id, identity_key, spec_version, data) VALUES (?, ?, ?, ?)"
_INSERT_OR_UPDATE = (
    _INSERT + " ON CONFLICT (id) DO UPDATE SET identity_key = excluded.identity_key, "
    "spec_version = excluded.spec_version, data = excluded.data"
)
_UPDATE_IF_VERSION = (
    "UPDATE workers SET identity_key = ?, spec_version = ?, data = ? "
    "WHERE id = ? AND spec_version = ?"
)
_RAISE_COUNTER = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)
_KEEP_PREFIX = (
    "INSERT INTO meta (key, value) VALUES ('id_prefix', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = coalesce(value, excluded.value)"
)
_SET_HEAD = "UPDATE meta SET value = ? WHERE key = 'change_seq'"

Row = tuple[str, str, int, str]


class SharedSqliteStore(SqliteReplicas, SqliteStore):
    """The SQLite store at ``path`` as replica ``replica`` of several (see the module
    docstring). ``replica_lease_secs``: a replica whose last heartbeat is older is no longer
    counted as live (it holds no drain, its jobs are claimed). ``poll_secs`` and
    ``max_poll_secs``: how often ``wait_for_changes`` looks, after news and when quiet. The
    other options are ``SqliteStore``'s."""

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        replica: str = "gateway",
        replica_lease_secs: float = 5.0,
        poll_secs: float = 0.005,
        max_poll_secs: float = 0.05,
        synchronous: Synchronous = "normal",
        check: bool = True,
        busy_timeout_secs: float = 5.0,
    ) -> None:
        if not 0 < poll_secs <= max_poll_secs:
            raise ValueError(
                f"need 0 < poll_secs <= max_poll_secs, not {poll_secs!r} and {max_poll_secs!r}"
            )
        self.replica = replica
        self.replica_lease_secs = replica_lease_secs
        self.poll_secs = poll_secs
        self.max_poll_secs = max_poll_secs
        self._interval = poll_secs  # the current wait between two looks
        self._closing = threading.Event()  # set by close(): a wait in progress ends at once
        self._closed = False
        self._watcher: sqlite3.Connection | None = None
        self._watched = (0, 0)  # the watcher's last data_version and head
        self._watcher_lock = threading.Lock()
        super().__init__(
            path, synchronous=synchronous, check=check, busy_timeout_secs=busy_timeout_secs
        )

    # ---- the Store interface -----------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """The single-writer interface: commit after whatever the log holds (a batch written
        without looking at other replicas' changes; the registry uses ``commit_after``)."""
        while True:
            with self._reading("reading the head") as conn:
                head = self._head(conn)
            try:
                self.commit_after(batch, head)
                return
            except Behind:
                continue

    def close(self) -> None:
        self._closed = True  # a wait_for_changes in another thread stops at once
        self._closing.set()
        super().close()

    # ---- the SharedStore interface -----------------------------------------------------

    def commit_after(self, batch: Batch, after: int) -> int:
        validate_batch(batch)
        if batch.empty:
            with self._reading("checking for newer changes") as conn:
                head = self._head(conn)
                missing = [] if head == after else self._changes_since(conn, after)
            if head != after:
                raise Behind(missing)
            return after
        payload = change_payload(batch)
        rows: list[Row] = [
            (worker_id, identity_key(plain), plain["spec_version"], _encode(plain))
            for worker_id, plain in batch.upserts.items()
        ]
        with self._transaction("a commit") as conn:
            head = self._head(conn)
            if head == after:
                self._write_change(conn, batch, head + 1, rows, payload)
        if head != after:  # nothing was written: others committed since, read what they did
            raise Behind(self.changes_since(after))
        return head + 1

    def commit_decided(self, after: int, decide: Callable[[list[Change]], Batch]) -> int:
        """``SharedStore.commit_decided``: inside one ``BEGIN IMMEDIATE``."""
        with self._transaction("a commit") as conn:
            head = self._head(conn)
            logged = conn.execute(
                "SELECT seq, replica, payload FROM changes WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
            if len(logged) == head - after:  # else the log no longer reaches back: see below
                batch = decide([self._change(*row) for row in logged])
                validate_batch(batch)
                if batch.empty:
                    return head
                rows: list[Row] = [
                    (worker_id, identity_key(plain), plain["spec_version"], _encode(plain))
                    for worker_id, plain in batch.upserts.items()
                ]
                self._write_change(conn, batch, head + 1, rows, change_payload(batch))
                return head + 1
        raise Behind(self.changes_since(after))  # the whole registry, read outside

    def changes_since(self, seq: int) -> list[Change]:
        with self._reading("reading changes") as conn:
            return self._changes_since(conn, seq)

    def wait_for_changes(self, timeout: float) -> bool:
        """Block until another connection moved the head (True) or ``timeout`` passes (False);
        True at once when the watching connection is (re)opened: something may have been
        missed. Raises ``StoreError`` when the file cannot be read."""
        with self._watcher_lock:
            if self._closed:
                raise StoreError(self.path, "the store is closed")
            try:
                if self._watcher is None:
                    self._watcher = self._connect()
                    self._watched = (_data_version(self._watcher), self._head(self._watcher))
                    return True
                return self._poll(self._watcher, timeout)
            except sqlite3.Error as error:
                self._close_watcher()
                raise StoreError(self.path, f"cannot watch for changes: {error}") from None
            finally:
                if self._closed:  # close() gave up waiting for us: the connection is ours
                    self._close_watcher()

    # ---- opening -----------------------------------------------------------------------

    def _open_file(self) -> sqlite3.Connection:
        if self._lock.alone:
            conn = super()._open_file()
            try:
                self._reset_replicas(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        conn = self._connect()  # others are in the file: only SQLite may read it now
        try:
            self.opened_version = self._check_in_use(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_in_use(self, conn: sqlite3.Connection) -> int:
        try:
            version = self._inspect_schema(conn)
        except sqlite3.DatabaseError as error:
            raise StoreError(self.path, f"is corrupt or not a database: {error}") from None
        if version < SCHEMA_VERSION:
            raise StoreError(
                self.path,
                f"is in use by replicas of an older gateway (schema version {version}, this "
                f"gateway's is {SCHEMA_VERSION}): stop them all to upgrade it",
            )
        return version

    def _reset_replicas(self, conn: sqlite3.Connection) -> None:
        """No other gateway is in the file: forget every replica, lease and drain record, and
        leave every job and scheduled recheck (``owns_work``) for anyone to claim (see the
        module docstring)."""
        with self._transaction("resetting the replicas' records", conn):
            for table in ("replicas", "drain_idle", "leases", "jobs"):
                conn.execute(f"DELETE FROM {table}")
            owned = [
                (worker_id, plain["job"]["job_id"], "")
                for worker_id, text in conn.execute("SELECT id, data FROM workers")
                if owns_work(plain := json.loads(text))
            ]
            conn.executemany(
                "INSERT INTO jobs (worker_id, job_id, replica) VALUES (?, ?, ?)", owned
            )

    # ---- the write path ----------------------------------------------------------------

    def _write_change(
        self, conn: sqlite3.Connection, batch: Batch, seq: int, rows: list[Row], payload: str
    ) -> None:
        if batch.deletes:
            deletes = [(worker_id,) for worker_id in batch.deletes]
            deleted = conn.executemany("DELETE FROM workers WHERE id = ?", deletes).rowcount
            if deleted != len(deletes):
                raise sqlite3.IntegrityError(
                    f"{len(deletes) - deleted} deleted workers were not stored"
                )
            conn.executemany("DELETE FROM drain_idle WHERE worker_id = ?", deletes)
        self._record_jobs(conn, batch)
        for row in rows:
            _write_worker(conn, row, batch.versions_before.get(row[0], _UNKNOWN))
        if batch.id_prefix is not None:
            conn.execute(_KEEP_PREFIX, (batch.id_prefix,))
        for name in ("id_high_water", "next_job_id"):
            value = getattr(batch, name)
            if value is not None:
                conn.execute(_RAISE_COUNTER, (name, value))
        conn.execute(_SET_HEAD, (seq,))
        conn.execute(
            "INSERT INTO changes (seq, replica, committed_at, payload) VALUES (?, ?, ?, ?)",
            (seq, self.replica, time.time(), payload),
        )
        if seq % PRUNE_EVERY == 0:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (seq - KEEP_CHANGES,))

    # ---- reading changes ---------------------------------------------------------------

    def _changes_since(self, conn: sqlite3.Connection, seq: int) -> list[Change]:
        rows = conn.execute(
            "SELECT seq, replica, payload FROM changes WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()
        if rows and rows[0][0] == seq + 1:
            return [self._change(*row) for row in rows]
        if self._head(conn) == seq:
            return []
        return [self._everything(conn)]  # the log no longer reaches back to seq

    def _everything(self, conn: sqlite3.Connection) -> Change:
        meta = self._read_meta(conn)
        return Change(
            seq=meta["change_seq"],
            upserts=self._read_workers(conn),
            id_high_water=meta["id_high_water"],
            next_job_id=meta["next_job_id"],
            full=True,
        )

    def _change(self, seq: int, replica: str, payload: str) -> Change:
        try:
            return change_from_payload(seq, replica, payload)
        except ValueError as error:
            raise StoreError(self.path, str(error)) from None

    def _head(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'change_seq'").fetchone()
        if row is None or not isinstance(row[0], int):
            raise StoreError(self.path, f"is corrupt: change_seq is {row and row[0]!r}")
        return row[0]

    # ---- waiting for changes -----------------------------------------------------------

    def _poll(self, conn: sqlite3.Connection, timeout: float) -> bool:
        """Poll ``data_version`` until the head moved (True), ``timeout`` passed or the store
        closed (False)."""
        deadline = time.monotonic() + timeout
        version, head = self._watched
        try:
            while not self._closed:
                now_version = _data_version(conn)
                if now_version != version:  # someone committed something: the head?
                    version = now_version
                    now_head = self._head(conn)
                    if now_head != head:
                        head = now_head
                        self._interval = self.poll_secs  # news: look often again
                        return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._closing.wait(min(self._interval, remaining))  # a pause between looks
                self._interval = min(self._interval * 2, self.max_poll_secs)
            return False
        finally:
            self._watched = (version, head)

    def _close_connections(self) -> None:
        try:
            super()._close_connections()
        finally:
            # a wait_for_changes holds the lock for at most one poll once _closed is set
            if self._watcher_lock.acquire(timeout=WATCHER_CLOSE_WAIT_SECS):
                try:
                    self._close_watcher()
                finally:
                    self._watcher_lock.release()

    def _close_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()

    # ---- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(
        self, what: str, conn: sqlite3.Connection | None = None
    ) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` (waiting up to ``busy_timeout_secs`` for the write lock) …
        ``COMMIT``; on any error ``ROLLBACK``, and an SQLite error becomes ``StoreError``."""
        if conn is None:
            conn = self._require_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as error:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise self._failure(what, error) from error
            raise

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        """One read transaction (a consistent snapshot); an SQLite error becomes
        ``StoreError``."""
        conn = self._require_open()
        try:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            raise self._failure(what, error) from error
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")

    def _failure(self, what: str, error: sqlite3.Error) -> StoreError:
        if isinstance(error, sqlite3.IntegrityError):
            found = f"the database refused the change ({what}, rolled back): {error}"
        elif "locked" in str(error) or "busy" in str(error):
            found = (
                f"{what} failed: another replica held the database longer than "
                f"{self.busy_timeout_secs:g} s ({error})"
            )
        else:
            found = f"{what} failed and was rolled back: {error}"
        return StoreError(self.path, found)


_UNKNOWN: Any = object()


def _write_worker(conn: sqlite3.Connection, row: Row, before: int | None) -> None:
    """One upserted worker; ``before``: its ``spec_version`` in the writer's table before
    the batch (None: new; ``_UNKNOWN``: a writer that keeps no versions)."""
    worker_id, key, version, data = row
    if before is None:  # new: its id was never stored (worker_ids' PRIMARY KEY says so)
        conn.execute("INSERT INTO worker_ids (id) VALUES (?)", (worker_id,))
        conn.execute(_INSERT, row)
    elif before is _UNKNOWN:  # insert or update, whatever is stored
        conn.execute(_INSERT_OR_UPDATE, row)
    else:  # compare-and-set: the stored version must be the one the writer's table had
        updated = conn.execute(_UPDATE_IF_VERSION, (key, version, data, worker_id, before))
        if updated.rowcount != 1:
            raise sqlite3.IntegrityError(f"worker {worker_id}: stored spec_version is not {before}")


def _encode(plain: Any) -> str:
    return json.dumps(plain, separators=(",", ":"))


def _data_version(conn: sqlite3.Connection) -> int:
    """Moves whenever another connection committed to the file (``PRAGMA data_version``)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
