"""SqliteStore: the registry in one SQLite file (stdlib ``sqlite3``; blocking, imports no trio).

**Layout**: ``actors/store/sqlite_schema.py`` (the tables of each version, the migrations).

**Ids ever stored.** A trigger on ``workers`` adds every inserted id to ``worker_ids``; an update
(the upsert's other path) does not fire it, so a single gateway pays one index insert per new
worker and nothing per change. The shared mode inserts a new worker's id there itself, so that an
id ever stored is refused (the PRIMARY KEY) even after its worker was deleted. Version 1 kept
no such table: the migration fills it from the workers then stored (ids deleted before are not
known, but the id source's prefix and high-water mark never hand them out again anyway).

**One gateway or several.** ``SqliteStore`` is one gateway's store (the exclusive lock, the
write path below). ``SharedSqliteStore`` (``actors/store/sqlite_shared.py``) lets several gateway
processes on one host share the file as replicas. A file moves freely between the two modes:
a single gateway writes no change rows, but nothing is shared while it runs, and a replica
opening the file loads all of it anyway.

**Write path.** ``commit(batch)`` encodes the changed rows to JSON first (outside the
transaction), then runs one ``BEGIN IMMEDIATE … COMMIT``: the deletes, then one upsert per
changed worker (``INSERT … ON CONFLICT(id) DO UPDATE``), then the counters that moved (usually
none: see ``Reservation``). Deletes go first so an address removed and registered again in the
same batch passes from the old id to the new one without tripping the UNIQUE key. A worker's
own address never changes (a PUT to another address is refused), so an update leaves the
``identity_key`` column and its index alone: one page written per changed worker instead of
two; a row whose key did change is found by the upsert's row count and rewritten whole. Any
failure rolls the whole transaction back and raises; nothing of the batch is stored. An empty
batch (every command of it refused) writes nothing.

**Durability.** WAL mode with ``synchronous=NORMAL`` by default. A commit returns once its
frames are written to the WAL file: they are in the kernel's page cache, which outlives the
process, so a kill -9 right after ``commit`` returns loses nothing (the next open replays the
WAL). That is the promise "an answer a client received is never lost" needs against a crash of
the gateway, at no fsync per commit. What NORMAL gives up is the last commits before a power
loss or kernel crash; ``synchronous="full"`` (one fsync of the WAL per commit) covers that too,
for the price of an fsync per batch (on this machine's virtual disk about +20 µs, on a real
disk milliseconds, where group commit is what keeps the rate up). The database file is never
half-written either way: SQLite's WAL commits are atomic.

**Versioning.** ``PRAGMA application_id`` = ``APPLICATION_ID`` marks the file as ours and
``PRAGMA user_version`` is the schema version. Opening an existing file first inspects it
without writing anything: the raw header (an SQLite file at all? whole pages? as long as its
header says, when no WAL is pending?), then, through a read-only connection, the application id,
the version and ``PRAGMA quick_check`` (as ``immutable`` when no WAL frames are pending, so a
refused file does not even get the ``-wal``/``-shm`` files a WAL reader makes). A foreign file
(another application id, not SQLite, an empty file), a newer version, or a truncated or corrupt
file stops the open with a ``StoreError`` saying what was found, and the file is never written
(a read-only connection cannot write or checkpoint). An older version is migrated in one
transaction (``MIGRATIONS``, one step per version), so a failed migration leaves the file as it
was. Version 0 was the prototype layout without the ``spec_version`` column; version 1 had
only ``workers`` and ``meta``.

**Creation.** A new file is built under a temporary name in the same directory (schema,
application id, version and meta in one transaction, WAL mode set, mode 0600 since worker
``api_key``s are in it, fsynced), then linked into place: a state file never exists
half-initialised, so an empty or headerless file at the path is never one of ours. The
directory must exist. If ``PATH-wal`` or ``PATH-shm`` exists without
``PATH``, the open is refused (a database deleted without its WAL: SQLite would replay that WAL
into the new file).

**Lock.** ``StateLock`` (``actors/store/lock.py``): an advisory ``flock`` on ``PATH.lock``,
taken before anything else and released at ``close``; exclusive here, shared among replicas
(which also serialise their set-up: see there).

**Threads.** The connection is made with ``check_same_thread=False`` because it is opened in one
thread and used in the writer's thread; calls must not overlap (the writer serialises them).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal, Self

from actors.store.base import (
    Batch,
    StoredState,
    StoreError,
    identity_key,
    validate_batch,
)
from actors.store.lock import StateLock
from actors.store.sqlite_schema import (
    APPLICATION_ID,
    HEADER_SIZE,
    INITIAL_META,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SET_META,
    SQLITE_MAGIC,
    TABLES,
    WAL_HEADER_SIZE,
)

# The update leaves identity_key alone (so its index is not rewritten: half the pages of an
# update) unless it really changed; such a row is skipped here and rewritten by _MOVE_KEY.
_UPSERT = (
    "INSERT INTO workers (id, identity_key, spec_version, data) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET spec_version = excluded.spec_version, data = excluded.data "
    "WHERE identity_key = excluded.identity_key"
)
_MOVE_KEY = "UPDATE workers SET identity_key = ?, spec_version = ?, data = ? WHERE id = ?"
_DELETE = "DELETE FROM workers WHERE id = ?"
_COUNTERS = ("id_high_water", "next_job_id")

Synchronous = Literal["normal", "full"]
Row = tuple[str, str, int, str]


class SqliteStore:
    """The SQLite store at ``path``, one gateway's; opening it locks, inspects, creates or
    migrates the file (blocking). ``check=False`` skips ``PRAGMA quick_check`` at open (it reads
    every page). ``busy_timeout_secs``: how long a statement waits for another connection's
    lock (an operator's sqlite3 shell; in the shared mode, the other replicas)."""

    blocking = True
    shared = False  # one writer: see SharedSqliteStore for replicas

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "normal",
        check: bool = True,
        busy_timeout_secs: float = 5.0,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        self.path = Path(path).absolute()
        self.synchronous = synchronous
        self.check = check
        self.busy_timeout_secs = busy_timeout_secs
        if not self.path.parent.is_dir():
            raise StoreError(self.path, f"its directory {self.path.parent} does not exist")
        if self.path.is_dir():
            raise StoreError(self.path, "is a directory, not a state file")
        self._conn: sqlite3.Connection | None = None
        self._lock = StateLock.acquire(self.path, shared=self.shared)
        try:
            self._conn = self._open_file()
            self._meta = self._read_meta(self._conn)
            self._lock.settle()
        except BaseException:
            self._close_connections()
            self._lock.release()
            raise

    # ---- the Store interface -----------------------------------------------------------

    def load(self) -> StoredState:
        conn = self._require_open()
        conn.execute("BEGIN")
        try:
            workers = self._read_workers(conn)
            meta = self._read_meta(conn)
        finally:
            conn.execute("COMMIT")
        return StoredState(
            workers=workers,
            id_prefix=meta["id_prefix"],
            id_high_water=meta["id_high_water"],
            next_job_id=meta["next_job_id"],
            schema_version=SCHEMA_VERSION,
            change_seq=meta["change_seq"],
        )

    def commit(self, batch: Batch) -> None:
        conn = self._require_open()
        validate_batch(batch)
        rows: list[Row] = [
            (
                worker_id,
                identity_key(plain),
                plain["spec_version"],
                json.dumps(plain, separators=(",", ":")),
            )
            for worker_id, plain in batch.upserts.items()
        ]
        meta = self._meta_changes(batch)
        if not rows and not batch.deletes and not meta:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._write(conn, rows, batch.deletes, meta)
            conn.execute("COMMIT")
        except BaseException as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise StoreError(
                    self.path, f"a commit failed and was rolled back: {error}"
                ) from error
            raise
        self._meta.update(meta)

    def close(self) -> None:
        try:
            self._close_connections()
        finally:
            self._lock.release()  # last: no gateway may open the file while ours are open

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def total_changes(self) -> int:
        """Rows inserted, updated or deleted through this store since it opened."""
        return self._require_open().total_changes

    # ---- the write path ----------------------------------------------------------------

    def _write(
        self,
        conn: sqlite3.Connection,
        rows: list[Row],
        deletes: Collection[str],
        meta: dict[str, Any],
    ) -> None:
        if deletes:
            conn.executemany(_DELETE, ((worker_id,) for worker_id in deletes))
        if rows and conn.executemany(_UPSERT, rows).rowcount != len(rows):
            self._move_keys(conn, rows)
        if meta:
            self._write_meta(conn, meta.items())

    @staticmethod
    def _move_keys(conn: sqlite3.Connection, rows: list[Row]) -> None:
        """Rewrite the rows the upsert skipped because their identity key changed (not
        possible through the API today; two workers trading keys in one batch is refused by
        the UNIQUE constraint)."""
        for worker_id, key, version, data in rows:
            [stored] = conn.execute(
                "SELECT identity_key FROM workers WHERE id = ?", (worker_id,)
            ).fetchone()
            if stored != key:
                conn.execute(_MOVE_KEY, (key, version, data, worker_id))

    @staticmethod
    def _write_meta(conn: sqlite3.Connection, items: Iterable[tuple[str, Any]]) -> None:
        conn.executemany(SET_META, items)

    def _meta_changes(self, batch: Batch) -> dict[str, Any]:
        """The meta values this batch moves; a prefix change or a counter moving backwards
        is a caller's bug (ids could be handed out twice): ValueError before any write."""
        changes: dict[str, Any] = {}
        stored_prefix = self._meta["id_prefix"]
        if batch.id_prefix is not None and batch.id_prefix != stored_prefix:
            if stored_prefix is not None:
                raise ValueError(f"id prefix is {stored_prefix!r}, not {batch.id_prefix!r}")
            changes["id_prefix"] = batch.id_prefix
        for name in _COUNTERS:
            value = getattr(batch, name)
            if value is None or value == self._meta[name]:
                continue
            if value < self._meta[name]:
                raise ValueError(f"{name} would move back from {self._meta[name]} to {value}")
            changes[name] = value
        if "id_high_water" in changes and stored_prefix is None and "id_prefix" not in changes:
            raise ValueError("an id high-water mark needs the id prefix it counts for")
        return changes

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(self.path, "the store is closed")
        return self._conn

    def _close_connections(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # the last connection checkpoints the WAL into the file

    # ---- open: inspect, create, connect, migrate ---------------------------------------

    def _open_file(self) -> sqlite3.Connection:
        """With the file locked and no other gateway in it: inspect it (``opened_version``),
        create or migrate it, and connect."""
        self.opened_version = self._inspect() if os.path.lexists(self.path) else None
        if self.opened_version is None:
            self._create()
        conn = self._connect()
        try:
            if self.opened_version is not None and self.opened_version < SCHEMA_VERSION:
                self._migrate(conn, self.opened_version)
        except BaseException:
            conn.close()
            raise
        return conn

    def _inspect(self) -> int:
        """The schema version of the existing file at ``path``, read without writing it; or
        StoreError saying why it cannot be used."""
        path = self.path
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(path, "is not a regular file")
        size = info.st_size
        if size == 0:
            raise StoreError(
                path, "is empty (0 bytes): not a state file (this gateway never leaves one empty)"
            )
        with open(path, "rb") as file:
            header = file.read(HEADER_SIZE)
        if not header.startswith(SQLITE_MAGIC[: len(header)]) or len(header) < len(SQLITE_MAGIC):
            raise StoreError(path, f"is not an SQLite database (it starts with {header[:16]!r})")
        if len(header) < HEADER_SIZE:
            raise StoreError(path, f"is truncated: {size} bytes, shorter than an SQLite header")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            raise StoreError(path, f"is corrupt: its header gives a page size of {page_size}")
        wal = Path(f"{path}-wal")
        wal_pending = wal.exists() and wal.stat().st_size > WAL_HEADER_SIZE
        if not wal_pending:
            # With frames pending in the WAL the file itself may lag (a checkpoint cut short):
            # then only SQLite, reading through the WAL, can judge it (quick_check below).
            if size % page_size:
                raise StoreError(
                    path,
                    f"is truncated: {size} bytes is not a whole number of {page_size}-byte pages",
                )
            pages = int.from_bytes(header[28:32], "big")
            if header[24:28] == header[92:96] and size < pages * page_size:
                raise StoreError(
                    path,
                    f"is truncated: its header says {pages} pages ({pages * page_size} bytes), "
                    f"the file has {size} bytes",
                )
        options = "mode=ro" if wal_pending else "mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(f"{path.as_uri()}?{options}", uri=True)
        except sqlite3.Error as error:
            raise StoreError(path, f"cannot be opened to read: {error}") from None
        try:
            return self._inspect_schema(conn)
        except sqlite3.DatabaseError as error:
            raise StoreError(path, f"is corrupt or not a database: {error}") from None
        finally:
            conn.close()

    def _inspect_schema(self, conn: sqlite3.Connection) -> int:
        path = self.path
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if application_id != APPLICATION_ID:
            raise StoreError(
                path,
                f"is an SQLite database of another application (application_id "
                f"{application_id:#x}, expected {APPLICATION_ID:#x}); refusing to touch it",
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                path,
                f"has schema version {version}, newer than this gateway's {SCHEMA_VERSION}: "
                "written by a newer gateway; upgrade this one",
            )
        if version < 0:
            raise StoreError(path, f"is corrupt: schema version {version}")
        if self.check:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise StoreError(path, f"is corrupt: {'; '.join(problems)}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        if not {"workers", "meta"} <= tables:
            raise StoreError(path, f"is corrupt: tables {sorted(tables)}, missing workers/meta")
        if version >= 2 and TABLES - tables:
            missing = ", ".join(sorted(TABLES - tables))
            raise StoreError(path, f"is corrupt: schema version {version} without {missing}")
        if version >= 1:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None or row[0] != version:
                raise StoreError(
                    path, f"is inconsistent: user_version {version}, meta says {row and row[0]}"
                )
        return int(version)

    def _create(self) -> None:
        path = self.path
        leftovers = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal")]
        found = [leftover.name for leftover in leftovers if os.path.lexists(leftover)]
        if found:
            raise StoreError(
                path,
                f"does not exist but {', '.join(found)} does: a state file deleted without its "
                "journal; restore the file or remove those too",
            )
        temporary = path.with_name(f".{path.name}.new")
        for suffix in ("", "-wal", "-shm", "-journal"):  # what a create cut short left (ours:
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)  # we hold the lock)
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            os.chmod(temporary, 0o600)  # it holds api_keys; SQLite gives -wal/-shm the same mode
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._write_meta(conn, {**INITIAL_META, "schema_version": SCHEMA_VERSION}.items())
            conn.execute("COMMIT")
        finally:
            conn.close()  # checkpoints everything into the temporary file
        try:
            _fsync(temporary)
            os.link(temporary, path)  # never replaces a file that appeared meanwhile
            os.unlink(temporary)
            _fsync(path.parent)
        except FileExistsError:
            os.unlink(temporary)
            raise StoreError(path, "appeared while it was being created") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            f"{self.path.as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,  # opened here, used in the writer's thread
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(self.path, f"cannot use WAL mode here (journal mode {mode})")
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_secs * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection, found: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for version in range(found, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._write_meta(conn, [("schema_version", SCHEMA_VERSION)])
            conn.execute("COMMIT")
        except BaseException as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not isinstance(error, Exception):
                raise
            raise StoreError(
                self.path,
                f"migration from schema version {found} to {SCHEMA_VERSION} failed and was "
                f"rolled back (the file is unchanged): {error}",
            ) from error

    def _read_workers(self, conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
        workers: dict[str, dict[str, Any]] = {}
        for worker_id, text in conn.execute("SELECT id, data FROM workers"):
            try:
                data = json.loads(text)
            except ValueError as error:
                raise StoreError(
                    self.path, f"worker {worker_id}: unreadable data: {error}"
                ) from None
            if not isinstance(data, dict) or data.get("id") != worker_id:
                raise StoreError(self.path, f"worker {worker_id}: its data names another id")
            workers[worker_id] = data
        return workers

    def _read_meta(self, conn: sqlite3.Connection) -> dict[str, Any]:
        meta = {**INITIAL_META, **dict(conn.execute("SELECT key, value FROM meta").fetchall())}
        prefix = meta["id_prefix"]
        counters = [meta[name] for name in (*_COUNTERS, "change_seq")]
        if (prefix is not None and not isinstance(prefix, str)) or not all(
            isinstance(value, int) and value >= 0 for value in counters
        ):
            raise StoreError(self.path, f"is corrupt: meta values {meta}")
        return meta


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
