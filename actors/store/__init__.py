"""Where the registry keeps its state beyond the process: the ``Store`` interface
(``base``), the in-memory store (``memory``, the default), SQLite (``sqlite``, one host:
one gateway, or replicas sharing the file with ``sqlite_shared``), PostgreSQL (``postgres``,
shared by replicas) and the writer thread that runs a store's blocking calls off the event loop
(``writer``).

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
from actors.store.lock import InUseByReplicas
from actors.store.memory import MemoryStore
from actors.store.sqlite import SqliteStore
from actors.store.sqlite_shared import SharedSqliteStore

MEMORY = ":memory:"


def open_store(
    state: str,
    *,
    replica: str = "gateway",
    replica_lease_secs: float = 5.0,
    shared: bool = False,
) -> Store:
    """The store a ``--state`` value names: ``:memory:``, a PostgreSQL URL (always shared by
    every replica; ``replica`` names this one) or a SQLite file's path: one gateway's, or with
    ``shared`` the replicas' on this host (``tmg serve --processes N``). Blocking: call it in
    the writer thread, ``open_store_writer(partial(open_store, state))``."""
    if state == MEMORY:
        if shared:
            raise ValueError("an in-memory registry cannot be shared: give a file or a URL")
        return MemoryStore()
    if is_postgres_url(state):
        from actors.store.postgres import PostgresStore  # psycopg only when used

        return PostgresStore(
            state,
            replica=replica,
            replica_lease_secs=replica_lease_secs,
            # a statement never outlasts half a lease: a slow one cannot make a live replica
            # look gone (its heartbeat waits behind it in the writer's thread)
            statement_timeout_secs=min(10.0, replica_lease_secs / 2),
        )
    if shared:
        return SharedSqliteStore(
            state,
            replica=replica,
            replica_lease_secs=replica_lease_secs,
            busy_timeout_secs=min(5.0, replica_lease_secs / 2),  # as statement_timeout above
        )
    return SqliteStore(state)


__all__ = [
    "MEMORY",
    "Batch",
    "InUseByReplicas",
    "MemoryStore",
    "PlainWorker",
    "Reservation",
    "SharedSqliteStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreInUse",
    "StoredState",
    "identity_key",
    "open_store",
    "validate_batch",
]
