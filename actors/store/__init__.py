"""Where the registry keeps its state beyond the process: the ``Store`` interface
(``base``), the in-memory store (``memory``, the default), SQLite (``sqlite``, one host),
PostgreSQL (``postgres``, shared by replicas) and the writer thread that runs a store's
blocking calls off the event loop (``writer``).

Everything here but ``writer`` is plain blocking code and imports no trio.
"""

from __future__ import annotations

from actors.store.base import (
    Batch,
    PlainWorker,
    Reservation,
    Store,
    StoredState,
    StoreError,
    StoreInUse,
    identity_key,
    is_postgres_url,
    validate_batch,
)
from actors.store.memory import MemoryStore
from actors.store.sqlite import SqliteStore

MEMORY = ":memory:"


def open_store(state: str, *, replica: str = "gateway", replica_lease_secs: float = 5.0) -> Store:
    """The store a ``--state`` value names: ``:memory:``, a PostgreSQL URL (shared by every
    replica; ``replica`` names this one) or a SQLite file's path (blocking: call it in the
    writer thread, ``open_store_writer(partial(open_store, state))``)."""
    if state == MEMORY:
        return MemoryStore()
    if is_postgres_url(state):
        from actors.store.postgres import PostgresStore  # psycopg only when used

        return PostgresStore(state, replica=replica, replica_lease_secs=replica_lease_secs)
    return SqliteStore(state)


__all__ = [
    "MEMORY",
    "Batch",
    "MemoryStore",
    "PlainWorker",
    "Reservation",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreInUse",
    "StoredState",
    "identity_key",
    "open_store",
    "validate_batch",
]
