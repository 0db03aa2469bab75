"""PostgresStore: the registry in PostgreSQL, shared by every replica (psycopg 3, blocking API;
imports no trio).

psycopg's async API runs only on asyncio, so its blocking API is used, in the writer's thread
(``actors/store/writer.py``) like SQLite; waiting for notifications blocks a second thread on a
second connection (``wait_for_changes``).

**Layout** (schema version 1; every name starts with ``tmg_``)::

    tmg_meta(id = 1, schema_version, change_seq, id_prefix, id_high_water, next_job_id)
    tmg_workers(id PRIMARY KEY, identity_key UNIQUE, spec_version, data)  -- data: plain JSON
    tmg_worker_ids(id PRIMARY KEY)        -- every id ever stored, never deleted: no reuse
    tmg_changes(seq PRIMARY KEY, replica, committed_at, payload)   -- the change log
    tmg_replicas(replica PRIMARY KEY, started_at, seen_at)         -- heartbeats
    tmg_drain_idle(worker_id, replica)    -- replicas with nothing in flight to a draining worker
    tmg_jobs(worker_id PRIMARY KEY, job_id, replica)   -- who runs each active job
    tmg_leases(name PRIMARY KEY, replica, until)        -- e.g. "health": who probes workers

Worker data (and so the change log) holds worker ``api_key``s: protect the database.

**One writer at a time, in commit order.** A commit's first statement is ``UPDATE tmg_meta SET
change_seq = change_seq + 1``: the row lock it takes is held to the commit, so the commits of
all replicas are serialised by the database, and the numbers they get follow commit order with
no gaps (a rolled-back transaction rolls its increment back). A reader that has applied change
N and reads ``seq > N`` can therefore never skip a change that commits late: N + 1 is the next
one to commit. If the number a commit gets is not ``after + 1``, another replica committed since
this one last looked: the transaction is rolled back and ``Behind`` carries the missing changes;
the registry applies them, decides its batch again on the now-current table (the same rules as a
single gateway, so the same answers: 409 with the existing id, 412, 404) and commits again.

**Constraints as the backstop.** The unique identity key, a compare-and-set on ``spec_version``
for every updated worker (``Batch.versions_before``), ``tmg_worker_ids`` (an id is inserted once,
ever) and a checked row count for every delete hold the invariants even against a writer whose
table is wrong; such a refusal rolls the batch back and becomes ``StoreError`` (503), never a
half-written batch.

**The feed.** Each commit writes its batch to ``tmg_changes`` under its number and sends
``NOTIFY tmg_changes`` (delivered at commit). Replicas wait for it on their own connection and
then read what they have not seen. The log keeps the last ``KEEP_CHANGES`` changes; a replica
further behind gets the whole registry as one ``Change(full=True)``.

**Work done once.** A batch that starts jobs records them in ``tmg_jobs`` under this replica
(``Batch.started_jobs``), in the same transaction; a job that ends (its worker's job is no
longer active) or whose worker is deleted loses its row. The lease of a job is its replica's
heartbeat: ``claim_jobs`` takes the rows whose replica is no longer live (``FOR UPDATE SKIP
LOCKED``, so two replicas never claim one row), and the registry runs each again under a new
job id, so a late result from the first run is stale. Health probes are done by the holder of
the ``health`` lease (``hold_lease``), renewed at every heartbeat.

**Failures.** A lost connection is reopened at the next call; while PostgreSQL cannot be
reached, every call raises ``StoreError`` (the registry answers writes 503 and keeps serving
what it has). Every statement has a timeout (``statement_timeout_secs``). Error messages name
the server without the password.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from actors.store.base import (
    Batch,
    Behind,
    Change,
    StoredState,
    StoreError,
    change_from_payload,
    change_payload,
    identity_key,
    is_postgres_url,
    validate_batch,
)
from actors.store.postgres_replicas import PostgresReplicas
from actors.store.postgres_schema import SCHEMA, SCHEMA_LOCK, SCHEMA_VERSION

T = TypeVar("T")
KEEP_CHANGES = 10_000  # changes kept in the log; a replica further behind reloads everything
CHANNEL = "tmg_changes"
LISTENER_CLOSE_WAIT_SECS = 5.0  # close() waits this long for a wait_for_changes to end


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    query = [
        (name, "***" if name == "password" else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    parts = parts._replace(query=urlencode(query, safe="*"))
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}{port}")
    return urlunsplit(parts)


class PostgresStore(PostgresReplicas):
    """The registry in the PostgreSQL database at ``url``, as replica ``replica``.

    Opening connects, and creates or migrates the schema (under an advisory lock, so replicas
    starting together do it once). ``replica_lease_secs``: a replica whose last heartbeat is
    older is no longer counted as live (it holds no drain)."""

    blocking = True
    shared = True

    def __init__(
        self,
        url: str,
        *,
        replica: str,
        replica_lease_secs: float = 5.0,
        connect_timeout_secs: float = 5.0,
        statement_timeout_secs: float = 10.0,
    ) -> None:
        if not is_postgres_url(url):
            raise ValueError("url must start with postgresql:// or postgres://")
        self.url = url
        self.name = redact(url)
        self.replica = replica
        self.replica_lease_secs = replica_lease_secs
        self._connect_timeout = max(int(connect_timeout_secs + 0.999), 1)
        self._statement_timeout_ms = int(statement_timeout_secs * 1000)
        self._conn: psycopg.Connection[Any] | None = None
        self._listener: psycopg.Connection[Any] | None = None
        self._listener_lock = threading.Lock()
        self._closed = False
        try:
            self.opened_version = self._call(self._prepare_schema)
        except BaseException:
            self.close()
            raise

    # ---- the Store interface -----------------------------------------------------------

    def load(self) -> StoredState:
        def read(conn: psycopg.Connection[Any]) -> StoredState:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                meta = self._meta(conn)
                rows = conn.execute("SELECT id, data FROM tmg_workers").fetchall()
            return StoredState(
                workers={worker_id: self._decode(worker_id, text) for worker_id, text in rows},
                id_prefix=meta["id_prefix"],
                id_high_water=meta["id_high_water"],
                next_job_id=meta["next_job_id"],
                schema_version=SCHEMA_VERSION,
                change_seq=meta["change_seq"],
            )

        return self._call(read)

    def commit(self, batch: Batch) -> None:
        """The single-writer interface: commit after whatever the log holds (a batch written
        without looking at other replicas' changes; the registry uses ``commit_after``)."""
        while True:
            try:
                self.commit_after(batch, self._call(lambda conn: self._meta(conn)["change_seq"]))
                return
            except Behind:
                continue

    def commit_after(self, batch: Batch, after: int) -> int:
        validate_batch(batch)
        if batch.empty:
            return self._call(lambda conn: self._check_head(conn, after))
        rows, payload = self._encoded(batch)  # before the lock: it is held for less
        return self._call(lambda conn: self._write(conn, batch, after, rows, payload))

    def commit_decided(self, after: int, decide: Callable[[list[Change]], Batch]) -> int:
        """``SharedStore.commit_decided``: the row lock first, then the missing changes, the
        decision and the writes, in one transaction."""

        def run(conn: psycopg.Connection[Any]) -> int:
            reload = False
            result = after
            with conn.transaction():
                seq = self._lock_head(conn)
                logged = conn.execute(
                    "SELECT seq, replica, payload FROM tmg_changes WHERE seq > %s ORDER BY seq",
                    (after,),
                ).fetchall()
                if len(logged) != seq - 1 - after:  # the log no longer reaches back
                    reload = True
                    raise psycopg.Rollback()
                batch = decide([self._change(*row) for row in logged])
                validate_batch(batch)
                if batch.empty:
                    result = seq - 1  # nothing to write: the head stays where it was
                    raise psycopg.Rollback()
                self._write_batch(conn, batch, seq, *self._encoded(batch))
                result = seq
            if reload:
                raise Behind(self._changes_since(conn, after))
            return result

        return self._call(run)

    def changes_since(self, seq: int) -> list[Change]:
        return self._call(lambda conn: self._changes_since(conn, seq))

    def close(self) -> None:
        self._closed = True
        self._drop_connection()
        # the listener's thread holds the lock for at most its wait's timeout
        if self._listener_lock.acquire(timeout=LISTENER_CLOSE_WAIT_SECS):
            try:
                if self._listener is not None:
                    self._listener.close()
                self._listener = None
            finally:
                self._listener_lock.release()

    def wait_for_changes(self, timeout: float) -> bool:
        """Block until a notification arrives (True) or ``timeout`` passes (False). Its own
        connection, (re)opened as needed; raises ``StoreError`` when it cannot be reached."""
        with self._listener_lock:
            if self._closed:
                raise StoreError(self.name, "the store is closed")
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = psycopg.connect(
                        self.url, autocommit=True, connect_timeout=self._connect_timeout
                    )
                    self._listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    return True  # (re)connected: something may have been missed
                notified = False
                for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                    notified = True
                return notified
            except psycopg.Error as error:
                if self._listener is not None:
                    self._listener.close()
                self._listener = None
                reason = _reason(error)
                raise StoreError(self.name, f"cannot listen for changes: {reason}") from None
            finally:
                if self._closed and self._listener is not None:  # close() gave up waiting
                    self._listener.close()
                    self._listener = None

    # ---- internals ---------------------------------------------------------------------

    def _call(self, function: Callable[[psycopg.Connection[Any]], T]) -> T:
        if self._closed:
            raise StoreError(self.name, "the store is closed")
        try:
            conn = self._connection()
            return function(conn)
        except (Behind, StoreError):
            raise
        except psycopg.OperationalError as error:
            self._drop_connection()
            raise StoreError(self.name, f"unreachable: {_reason(error)}") from None
        except psycopg.IntegrityError as error:
            raise StoreError(
                self.name, f"the database refused the change: {_reason(error)}"
            ) from None
        except psycopg.Error as error:
            if self._conn is not None and self._conn.broken:
                self._drop_connection()
            raise StoreError(self.name, f"failed: {_reason(error)}") from None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop_connection()
            self._conn = psycopg.connect(
                self.url,
                connect_timeout=self._connect_timeout,
                options=f"-c statement_timeout={self._statement_timeout_ms}",
            )
            self._conn.autocommit = True  # transactions are explicit (conn.transaction())
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _prepare_schema(self, conn: psycopg.Connection[Any]) -> int | None:
        """Create the schema if there is none; refuse a newer one. The version found (None:
        created now)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            exists = conn.execute("SELECT to_regclass('tmg_meta') IS NOT NULL").fetchone()
            if exists is None or not exists[0]:
                for statement in SCHEMA:
                    conn.execute(statement)
                return None
            row = conn.execute("SELECT schema_version FROM tmg_meta WHERE id = 1").fetchone()
            if row is None:
                raise StoreError(self.name, "tmg_meta has no row: not a gateway's registry")
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    self.name,
                    f"schema version {version}, newer than this gateway's {SCHEMA_VERSION}: "
                    "upgrade the gateway",
                )
            return version

    def _meta(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        row = conn.execute(
            "SELECT change_seq, id_prefix, id_high_water, next_job_id FROM tmg_meta WHERE id = 1"
        ).fetchone()
        if row is None:
            raise StoreError(self.name, "tmg_meta has no row")
        return {
            "change_seq": int(row[0]),
            "id_prefix": row[1],
            "id_high_water": int(row[2]),
            "next_job_id": int(row[3]),
        }

    def _check_head(self, conn: psycopg.Connection[Any], after: int) -> int:
        head = self._meta(conn)["change_seq"]
        if head != after:
            raise Behind(self._changes_since(conn, after))
        return after

    def _write(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        after: int,
        rows: list[tuple[str, str, int, str]],
        payload: str,
    ) -> int:
        behind = False
        with conn.transaction():
            seq = self._lock_head(conn)
            if seq != after + 1:  # others committed since: nothing of this batch is written
                behind = True
                raise psycopg.Rollback()
            self._write_batch(conn, batch, seq, rows, payload)
        if behind:  # read after the rollback (a full reload needs a transaction of its own)
            raise Behind(self._changes_since(conn, after))
        return seq

    @staticmethod
    def _lock_head(conn: psycopg.Connection[Any]) -> int:
        """The next change number; its row lock is this transaction's until it ends: the
        commits of all replicas pass here one at a time."""
        row = conn.execute(
            "UPDATE tmg_meta SET change_seq = change_seq + 1 WHERE id = 1 RETURNING change_seq"
        ).fetchone()
        assert row is not None
        return int(row[0])

    @staticmethod
    def _encoded(batch: Batch) -> tuple[list[tuple[str, str, int, str]], str]:
        """The batch's worker rows and its change payload, as written."""
        rows = [
            (worker_id, identity_key(plain), plain["spec_version"], json.dumps(plain))
            for worker_id, plain in batch.upserts.items()
        ]
        return rows, change_payload(batch)

    def _write_batch(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        seq: int,
        rows: list[tuple[str, str, int, str]],
        payload: str,
    ) -> None:
        """Write ``batch`` as change ``seq`` (the lock is held)."""
        checks: list[tuple[psycopg.Cursor[Any], int, str]] = []  # (cursor, rows, error)
        with conn.pipeline():  # the rest in one round trip (results checked at the end)
            self._write_rows(conn, batch, rows, checks)
            conn.execute(
                "UPDATE tmg_meta SET id_prefix = coalesce(id_prefix, %s), "
                "id_high_water = greatest(id_high_water, %s), "
                "next_job_id = greatest(next_job_id, %s) WHERE id = 1",
                (batch.id_prefix, batch.id_high_water or 0, batch.next_job_id or 0),
            )
            conn.execute(
                "INSERT INTO tmg_changes (seq, replica, payload) VALUES (%s, %s, %s)",
                (seq, self.replica, payload),
            )
            if seq % 1000 == 0:
                conn.execute("DELETE FROM tmg_changes WHERE seq <= %s", (seq - KEEP_CHANGES,))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
        for cursor, expected, error in checks:
            if cursor.rowcount != expected:
                raise psycopg.IntegrityError(error)

    def _write_rows(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        rows: list[tuple[str, str, int, str]],
        checks: list[tuple[psycopg.Cursor[Any], int, str]],
    ) -> None:
        """The batch's deletes, job records and worker rows; each row count to check goes to
        ``checks`` (a delete of a worker not stored, a compare-and-set that found another
        ``spec_version``)."""
        if batch.deletes:
            deleted = list(batch.deletes)
            cursor = conn.execute("DELETE FROM tmg_workers WHERE id = ANY(%s)", (deleted,))
            checks.append((cursor, len(deleted), "a deleted worker was not stored"))
            conn.execute("DELETE FROM tmg_drain_idle WHERE worker_id = ANY(%s)", (deleted,))
        self._record_jobs(conn, batch)
        for worker_id, key, version, data in rows:
            before = batch.versions_before.get(worker_id, _UNKNOWN)
            if before is None:  # new: its id was never stored (the PRIMARY KEY says so)
                conn.execute("INSERT INTO tmg_worker_ids (id) VALUES (%s)", (worker_id,))
                conn.execute(
                    "INSERT INTO tmg_workers (id, identity_key, spec_version, data) "
                    "VALUES (%s, %s, %s, %s)",
                    (worker_id, key, version, data),
                )
            elif before is _UNKNOWN:  # a writer that keeps no versions: insert or update
                conn.execute(
                    "INSERT INTO tmg_worker_ids (id) VALUES (%s) ON CONFLICT DO NOTHING",
                    (worker_id,),
                )
                conn.execute(
                    "INSERT INTO tmg_workers (id, identity_key, spec_version, data) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                    "identity_key = excluded.identity_key, "
                    "spec_version = excluded.spec_version, data = excluded.data",
                    (worker_id, key, version, data),
                )
            else:
                cursor = conn.execute(
                    "UPDATE tmg_workers SET identity_key = %s, spec_version = %s, data = %s "
                    "WHERE id = %s AND spec_version = %s",
                    (key, version, data, worker_id, before),
                )
                error = f"worker {worker_id}: stored spec_version is not {before}"
                checks.append((cursor, 1, error))

    def _changes_since(self, conn: psycopg.Connection[Any], seq: int) -> list[Change]:
        rows = conn.execute(
            "SELECT seq, replica, payload FROM tmg_changes WHERE seq > %s ORDER BY seq", (seq,)
        ).fetchall()
        if rows and rows[0][0] == seq + 1:
            return [self._change(*row) for row in rows]
        head = self._meta(conn)["change_seq"]
        if head == seq:
            return []
        return [self._everything(conn)]  # the log no longer reaches back to seq

    def _everything(self, conn: psycopg.Connection[Any]) -> Change:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            meta = self._meta(conn)
            rows = conn.execute("SELECT id, data FROM tmg_workers").fetchall()
        return Change(
            seq=meta["change_seq"],
            upserts={worker_id: self._decode(worker_id, text) for worker_id, text in rows},
            id_high_water=meta["id_high_water"],
            next_job_id=meta["next_job_id"],
            full=True,
        )

    def _change(self, seq: int, replica: str, payload: str) -> Change:
        try:
            return change_from_payload(seq, replica, payload)
        except ValueError as error:
            raise StoreError(self.name, str(error)) from None

    def _decode(self, worker_id: str, text: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise StoreError(self.name, f"worker {worker_id}: unreadable data: {error}") from None
        if not isinstance(data, dict) or data.get("id") != worker_id:
            raise StoreError(self.name, f"worker {worker_id}: its data names another id")
        return data


_UNKNOWN: Any = object()


def _reason(error: psycopg.Error) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
