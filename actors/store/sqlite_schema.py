"""The SQLite state file's format: our application id, the schema version, the tables of each
version and the migrations between them (the stores in ``sqlite.py`` and ``sqlite_shared.py``
read and write it; ``sqlite.py``'s docstring says how it is opened, versioned and written).

**Layout** (schema version 2)::

    workers(id TEXT PRIMARY KEY, identity_key TEXT NOT NULL UNIQUE,
            spec_version INTEGER NOT NULL, data TEXT NOT NULL)   -- data: the plain worker, JSON
    meta(key TEXT PRIMARY KEY, value)  -- schema_version, id_prefix, id_high_water, next_job_id,
                                       -- change_seq (the shared mode's newest change number)
    worker_ids(id TEXT PRIMARY KEY)    -- every id ever stored, never deleted: no reuse
    -- only the shared mode (``actors/store/sqlite_shared.py``) writes these:
    changes(seq INTEGER PRIMARY KEY, replica, committed_at REAL, payload)  -- the change log
    replicas(replica TEXT PRIMARY KEY, started_at REAL, seen_at REAL)      -- heartbeats
    drain_idle(worker_id, replica)     -- replicas with nothing in flight to a draining worker
    jobs(worker_id TEXT PRIMARY KEY, job_id, replica)   -- who runs each active job
    leases(name TEXT PRIMARY KEY, replica, until REAL)  -- e.g. "health": who probes workers

``identity_key`` and ``spec_version`` are copies of fields inside ``data``, as columns so that
the database can enforce what the shared mode relies on (one worker per address; a
compare-and-set on the spec version). The worker data (and the change log) holds ``api_key``s:
protect the file. Times: ``time.time()`` for ``committed_at``, ``CLOCK_BOOTTIME`` seconds for the
replicas' records (``sqlite_replicas.py``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

APPLICATION_ID = 0x544D4753  # "TMGS": trio model gateway state
SCHEMA_VERSION = 2
SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
WAL_HEADER_SIZE = 32

_V1_TABLES = (
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        identity_key TEXT NOT NULL UNIQUE,
        spec_version INTEGER NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
)
_V2_TABLES = (
    "CREATE TABLE worker_ids (id TEXT PRIMARY KEY) WITHOUT ROWID",
    """CREATE TRIGGER worker_ids_on_insert AFTER INSERT ON workers BEGIN
        INSERT OR IGNORE INTO worker_ids (id) VALUES (NEW.id);
    END""",
    """CREATE TABLE changes (
        seq INTEGER PRIMARY KEY,
        replica TEXT NOT NULL,
        committed_at REAL NOT NULL,
        payload TEXT NOT NULL
    )""",
    """CREATE TABLE replicas (
        replica TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        seen_at REAL NOT NULL
    )""",
    """CREATE TABLE drain_idle (
        worker_id TEXT NOT NULL,
        replica TEXT NOT NULL,
        PRIMARY KEY (worker_id, replica)
    ) WITHOUT ROWID""",
    """CREATE TABLE jobs (
        worker_id TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL,
        replica TEXT NOT NULL
    )""",
    """CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        replica TEXT NOT NULL,
        until REAL NOT NULL
    )""",
)
SCHEMA = _V1_TABLES + _V2_TABLES
TABLES = frozenset(
    {"workers", "meta", "worker_ids", "changes", "replicas", "drain_idle", "jobs", "leases"}
)
SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

INITIAL_META: dict[str, Any] = {
    "id_prefix": None,
    "id_high_water": 0,
    "next_job_id": 1,
    "change_seq": 0,
}


def _v0_to_v1(conn: sqlite3.Connection) -> None:
    """Version 0 had no ``spec_version`` column: add it, filled from each row's data."""
    conn.execute("ALTER TABLE workers ADD COLUMN spec_version INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE workers SET spec_version = json_extract(data, '$.spec_version')")


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Version 2 adds what replicas sharing the file need (see the layout): its tables, every
    stored id in ``worker_ids``, and ``change_seq`` 0 (no change numbered yet)."""
    for statement in _V2_TABLES:
        conn.execute(statement)
    conn.execute("INSERT INTO worker_ids (id) SELECT id FROM workers")
    conn.execute(SET_META, ("change_seq", 0))


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _v0_to_v1, 1: _v1_to_v2}
"""Version N -> N+1, each run inside the one migration transaction."""
