"""The store interface: what the registry keeps outside its process, and the values it trades.

A store holds three things: every worker as plain JSON-able data (``codec.worker_to_plain``),
the worker-id source's state (its fixed random prefix and a high-water mark of its counter) and
the next job id. The registry actor owns a ``WorkerTable``; after applying a batch of commands
it hands the store one ``Batch`` with only what that batch changed, the store writes it as one
transaction (group commit), and only then does the actor publish its snapshot and answer:

    apply commands → Batch(upserts, deletes, counters) → store.commit(batch) → publish → replies

so an answer a client received is never lost, and nothing is published that is not stored.

Every method of ``Store`` is plain, synchronous and may block (file or network I/O). The actor
never calls them on the event loop: ``actors.store.writer`` runs them in one dedicated thread.

Counters are reserved ahead of use (``Reservation``): the store keeps a mark at or above every
value that may have been handed out, moved in blocks (1,000 by default), so a restart continues
past every id ever used without every create writing the mark. Nothing a batch hands out leaves
the actor before that batch's commit returns, so persisting the mark in the same transaction as
the batch is already enough for correctness; the block only saves the extra meta-row write (one
more page in the WAL) on nearly every commit. A restart skips what was left of the block: at
most 1,000 ids per restart out of a 48-bit counter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

WorkerId = str  # as in actors.core.model, not imported: the store needs none of the core
PlainWorker = Mapping[str, Any]
"""A worker as ``codec.worker_to_plain`` gives it: JSON-able, carries ``id``, ``spec.url`` and
``spec_version`` (the only fields a store reads; the rest is kept as it is)."""


class StoreError(Exception):
    """The store cannot be used: ``path`` is the state file (or the store's address) and
    ``found`` says what was found there, in words an operator can act on."""

    def __init__(self, path: str | Path, found: str) -> None:
        what = "store" if "://" in str(path) else "state file"
        super().__init__(f"{what} {path}: {found}")
        self.path = str(path)
        self.found = found


class StoreInUse(StoreError):
    """Another gateway holds the state file (``holder_pid`` is None if it could not be read)."""

    def __init__(self, path: str | Path, lock_path: str | Path, holder_pid: int | None) -> None:
        holder = "pid unknown" if holder_pid is None else f"pid {holder_pid}"
        super().__init__(path, f"in use by another gateway ({holder}; lock held on {lock_path})")
        self.lock_path = str(lock_path)
        self.holder_pid = holder_pid


@dataclass(frozen=True, slots=True)
class StoredState:
    """Everything ``load()`` gives back.

    ``id_high_water``: every worker-id counter value ever handed out is at or below it; the
    id source restarts with its counter at this value (the next id is ``id_high_water + 1``)
    and with ``id_prefix`` (None: nothing was ever stored, pick a fresh prefix and store it).
    ``next_job_id``: every job id ever handed out is below it; the table restarts from it.
    ``schema_version``: the file's schema version after any migration (None: no schema, the
    in-memory store)."""

    workers: dict[WorkerId, dict[str, Any]]
    id_prefix: str | None = None
    id_high_water: int = 0
    next_job_id: int = 1
    schema_version: int | None = None
    change_seq: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    """The changes of one batch of commands, written as one transaction.

    ``upserts``: worker id -> the worker's whole plain data after the batch (a changed worker
    is one row, written whole). ``deletes``: ids of workers that are gone (deleting an id the
    store does not hold is harmless for a single writer's store; a shared store refuses it).
    An id is in at most one of the two. ``id_prefix``, ``id_high_water``, ``next_job_id``: the
    new values to keep, or None when unchanged (see ``Reservation``); a store writes a counter
    only when it differs from what it holds. ``versions_before``: for an upserted worker, the
    ``spec_version`` the writer's table held before the batch (None: the worker is new), for a
    shared store's compare-and-set; a store of one writer may ignore it. ``started_jobs``:
    worker id -> the job this batch started, which the writer runs (a shared store records who
    runs each job, for ``claim_jobs``)."""

    upserts: Mapping[WorkerId, PlainWorker] = field(default_factory=dict)
    deletes: Collection[WorkerId] = ()
    id_prefix: str | None = None
    id_high_water: int | None = None
    next_job_id: int | None = None
    versions_before: Mapping[WorkerId, int | None] = field(default_factory=dict)
    started_jobs: Mapping[WorkerId, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return (
            not self.upserts
            and not self.deletes
            and self.id_prefix is None
            and self.id_high_water is None
            and self.next_job_id is None
        )


class Store(Protocol):
    """What the registry needs from a store. Methods are synchronous and may block.

    ``blocking``: True when the calls do I/O, so the writer runs them in its thread; False
    (the in-memory store) lets it call them inline, as they take microseconds.

    ``commit`` writes all of a batch or nothing. If it raises ``StoreError`` (the store
    refused: disk full, I/O error, a lock), nothing of the batch is stored: the registry takes
    the batch back from its table, publishes nothing of it and answers its asks 503
    (``StoreUnavailable``), and carries on. Any other exception is a bug and stops the gateway.
    ``close`` releases the store (file lock, connection); it is idempotent."""

    @property
    def blocking(self) -> bool: ...

    def load(self) -> StoredState: ...

    def commit(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """One committed batch of a shared store, as every replica applies it.

    ``seq``: its number; the numbers have no gaps and follow commit order. ``upserts`` and
    ``deletes`` as in ``Batch``; ``id_high_water``/``next_job_id``: the writer's counters
    after it (every replica keeps the highest it saw, so ids are never handed out twice);
    ``replica``: who wrote it. ``full``: not a batch but the whole registry as of ``seq`` (a
    replica too far behind for the kept log): every worker not in ``upserts`` is gone."""

    seq: int
    upserts: Mapping[WorkerId, Mapping[str, Any]]
    deletes: Collection[WorkerId] = ()
    id_high_water: int = 0
    next_job_id: int = 1
    replica: str = ""
    full: bool = False


class Behind(Exception):
    """A shared store refused a commit because other replicas committed since the writer's
    last change: ``changes`` (in order, up to the newest) must be applied first, and the batch
    decided again on the result. Nothing of the refused batch is stored."""

    def __init__(self, changes: list[Change]) -> None:
        super().__init__(f"{len(changes)} changes from other replicas to apply first")
        self.changes = changes


class SharedStore(Store, Protocol):
    """A store several gateways (replicas) write at once (``actors/store/postgres.py``).

    ``commit_after(batch, after)`` commits ``batch`` only if ``after`` is still the newest
    change number and returns the batch's own number (``after`` itself for an empty batch:
    then it is only a check that nothing newer exists); else it raises ``Behind``.
    ``commit_decided(after, decide)`` takes the writers' lock first, then calls ``decide``
    with the changes that followed ``after`` (the caller takes them in and decides its batch
    again) and commits the batch it returns, in the same transaction: no other replica can
    commit in between, so it is never behind; it returns the new head (the old one when the
    batch is empty). Only when the log no longer reaches back to ``after`` does it raise
    ``Behind`` (with the whole registry) without calling ``decide``.
    ``changes_since(seq)`` reads what followed ``seq``. ``wait_for_changes(timeout)`` blocks
    until another replica may have committed (a notification) or ``timeout`` passes; it uses
    its own connection, so it runs in its own thread while the writer's calls go on.
    ``heartbeat()`` records this replica as alive and returns the live replicas' ids;
    ``join()`` is the first heartbeat, at start-up, and leaves any job recorded under this
    replica's name (from before a restart) for anyone to claim.
    ``record_idle(worker_id)`` records that this replica has nothing in flight to a draining
    worker and returns whether every live replica has. ``claim_jobs(limit)``: the active jobs
    whose replica is no longer live, each made this replica's, as ``(worker_id, job_id)``;
    ``release_job`` forgets one that turned out to be over. ``hold_lease(name)``: take or keep
    a named lease for ``replica_lease_secs``; True while this replica holds it."""

    replica: str
    shared: bool  # True: this store is written by several replicas

    def commit_after(self, batch: Batch, after: int) -> int: ...

    def commit_decided(self, after: int, decide: Callable[[list[Change]], Batch]) -> int: ...

    def changes_since(self, seq: int) -> list[Change]: ...

    def wait_for_changes(self, timeout: float) -> bool: ...

    def heartbeat(self) -> list[str]: ...

    def record_idle(self, worker_id: WorkerId) -> bool: ...

    def join(self) -> None: ...

    def claim_jobs(self, limit: int) -> list[tuple[WorkerId, int]]: ...

    def release_job(self, worker_id: WorkerId, job_id: int) -> None: ...

    def hold_lease(self, name: str) -> bool: ...


def change_payload(batch: Batch) -> str:
    """A batch as a shared store keeps it in its change log (JSON)."""
    return json.dumps(
        {
            "upserts": dict(batch.upserts),
            "deletes": sorted(batch.deletes),
            "id_prefix": batch.id_prefix,
            "id_high_water": batch.id_high_water,
            "next_job_id": batch.next_job_id,
        },
        separators=(",", ":"),
    )


def change_from_payload(seq: int, replica: str, payload: str) -> Change:
    """The ``Change`` numbered ``seq`` from its log entry; ValueError if it is unreadable."""
    try:
        data = json.loads(payload)
        upserts, deletes = data["upserts"], data["deletes"]
        if not isinstance(upserts, dict) or not all(isinstance(p, dict) for p in upserts.values()):
            raise ValueError("upserts is not an object of worker objects")
        if not isinstance(deletes, list) or not all(isinstance(d, str) for d in deletes):
            raise ValueError("deletes is not a list of ids")
        return Change(
            seq=int(seq),
            upserts=upserts,
            deletes=deletes,
            id_high_water=int(data["id_high_water"] or 0),
            next_job_id=int(data["next_job_id"] or 0),
            replica=replica,
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"change {seq}: unreadable: {error!r}") from None


def owns_work(plain: PlainWorker) -> bool:
    """Whether a replica is working on this worker (a shared store keeps a job record for it,
    to be claimed if that replica stops): an active job, or a failed registration whose
    recheck that replica has scheduled."""
    job = plain.get("job")
    if not isinstance(job, Mapping):
        return False
    if job.get("state") in ("queued", "running"):
        return True
    spec = plain.get("spec")
    rechecked = isinstance(spec, Mapping) and bool(spec.get("recheck_interval_secs"))
    return plain.get("status") == "failed" and rechecked


def is_postgres_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def is_shared(store: Store) -> bool:
    """True for a store other replicas write too (its ``shared`` attribute says so)."""
    return bool(getattr(store, "shared", False))


class Reservation:
    """Keeps a persisted mark at or above a counter, moving it in blocks.

    ``advance(value)`` is called with the highest value that may be handed out once the batch
    is answered (the id source's counter; the table's ``next_job_id``, which over-covers by one
    and is harmless). It returns the new mark to put in the batch, or None when the persisted
    one already covers ``value``. The mark only grows."""

    def __init__(self, mark: int, block: int = 1000) -> None:
        if block < 1:
            raise ValueError("block must be at least 1")
        self.mark = mark
        self.block = block

    def advance(self, value: int) -> int | None:
        if value <= self.mark:
            return None
        self.mark = value + self.block
        return self.mark


def identity_key(plain: PlainWorker) -> str:
    """The worker's identity key (``host:port``) from its plain data. ``spec.url`` is the
    canonical text (``WorkerUrl.text``: ``scheme://host:port`` or bare ``host:port``), whose
    netloc is the key, so no re-parsing is needed."""
    url: str = plain["spec"]["url"]
    _, sep, netloc = url.partition("://")
    return netloc if sep else url


def validate_batch(batch: Batch) -> None:
    """Cheap shape checks (O(changed rows)); a failure is a bug in the caller: ValueError."""
    for worker_id, plain in batch.upserts.items():
        if not isinstance(worker_id, str) or not isinstance(plain, Mapping):
            raise ValueError(f"upsert {worker_id!r}: expected a str id and plain worker data")
        if plain.get("id") != worker_id:
            raise ValueError(f"upsert {worker_id!r}: its data carries id {plain.get('id')!r}")
        spec = plain.get("spec")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("url"), str):
            raise ValueError(f"upsert {worker_id!r}: no spec.url")
        version = plain.get("spec_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"upsert {worker_id!r}: spec_version is not an int")
    for worker_id, version in batch.versions_before.items():
        if worker_id not in batch.upserts:
            raise ValueError(f"versions_before names {worker_id!r}, which is not upserted")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ValueError(f"versions_before[{worker_id!r}] is not an int or None")
    for worker_id, job_id in batch.started_jobs.items():
        if worker_id not in batch.upserts or not isinstance(job_id, int):
            raise ValueError(f"started_jobs[{worker_id!r}] must be an upserted worker's job id")
    for worker_id in batch.deletes:
        if not isinstance(worker_id, str):
            raise ValueError(f"delete {worker_id!r}: expected a str id")
        if worker_id in batch.upserts:
            raise ValueError(f"worker {worker_id!r} is both upserted and deleted")
    if batch.id_prefix is not None and (
        not isinstance(batch.id_prefix, str) or not batch.id_prefix
    ):
        raise ValueError("id_prefix must be a non-empty string")
    for name in ("id_high_water", "next_job_id"):
        value = getattr(batch, name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ValueError(f"{name} must be an int >= 0, not {value!r}")
