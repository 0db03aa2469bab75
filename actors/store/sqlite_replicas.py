"""The replicas' records in a shared SQLite file, beside the registry's data
(``sqlite_shared.py``): who is alive (heartbeats), who has nothing in flight to a draining
worker, who runs each job, and who holds each lease, as in PostgreSQL
(``postgres_replicas.py``), on the host's ``CLOCK_BOOTTIME``. ``SqliteReplicas`` is the half of
``SharedSqliteStore`` that keeps them; ``sqlite_shared.py``'s docstring explains both.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager

from actors.store.base import Batch, owns_work


def clock() -> float:
    """Seconds on a clock every process of the host shares and no one sets (unlike
    ``time.time()``, which a clock step could move past every lease at once)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class SqliteReplicas:
    """Heartbeats, drain records, job records and leases (see the module docstring). The
    store provides ``replica``, ``replica_lease_secs`` and ``_transaction`` (``BEGIN
    IMMEDIATE`` ... ``COMMIT``, SQLite errors turned into ``StoreError``)."""

    replica: str
    replica_lease_secs: float

    def _transaction(
        self, what: str, conn: sqlite3.Connection | None = None
    ) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def heartbeat(self) -> list[str]:
        with self._transaction("a heartbeat") as conn:
            return self._beat(conn, clock())

    def record_idle(self, worker_id: str) -> bool:
        live_since = clock() - self.replica_lease_secs
        with self._transaction("recording a drain idle") as conn:
            # BEGIN IMMEDIATE orders the replicas recording: the last one sees every record
            stored = conn.execute("SELECT 1 FROM workers WHERE id = ?", (worker_id,)).fetchone()
            if stored is None:
                return True  # gone already: nothing to wait for
            conn.execute(
                "INSERT INTO drain_idle (worker_id, replica) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (worker_id, self.replica),
            )
            [waiting] = conn.execute(
                "SELECT count(*) FROM replicas r WHERE r.seen_at > ? AND NOT EXISTS "
                "(SELECT 1 FROM drain_idle d WHERE d.worker_id = ? AND d.replica = r.replica)",
                (live_since, worker_id),
            ).fetchone()
        return bool(waiting == 0)

    def join(self) -> None:
        """Start as a replica: a heartbeat, and any job still recorded under this replica's
        name (from before a restart: nothing runs here yet) is left for anyone to claim."""
        with self._transaction("joining") as conn:
            self._beat(conn, clock())
            conn.execute("UPDATE jobs SET replica = '' WHERE replica = ?", (self.replica,))

    def claim_jobs(self, limit: int) -> list[tuple[str, int]]:
        live_since = clock() - self.replica_lease_secs
        with self._transaction("claiming jobs") as conn:
            rows = conn.execute(
                "SELECT j.worker_id, j.job_id FROM jobs j WHERE j.replica <> ? "
                "AND NOT EXISTS (SELECT 1 FROM replicas r "
                "WHERE r.replica = j.replica AND r.seen_at > ?) "
                "ORDER BY j.worker_id LIMIT ?",
                (self.replica, live_since, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE jobs SET replica = ? WHERE worker_id = ?",
                [(self.replica, worker_id) for worker_id, _ in rows],
            )
        return [(worker_id, int(job_id)) for worker_id, job_id in rows]

    def release_job(self, worker_id: str, job_id: int) -> None:
        with self._transaction("releasing a job") as conn:
            conn.execute("DELETE FROM jobs WHERE worker_id = ? AND job_id = ?", (worker_id, job_id))

    def hold_lease(self, name: str) -> bool:
        now = clock()
        with self._transaction("holding a lease") as conn:
            cursor = conn.execute(
                "INSERT INTO leases (name, replica, until) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET replica = excluded.replica, "
                "until = excluded.until "
                "WHERE leases.replica = excluded.replica OR leases.until < ?",
                (name, self.replica, now + self.replica_lease_secs, now),
            )
            return cursor.rowcount == 1

    def _record_jobs(self, conn: sqlite3.Connection, batch: Batch) -> None:
        """Who runs each active job: a started job under this replica, an ended one (or one
        whose worker is deleted) forgotten."""
        over = [
            worker_id
            for worker_id, plain in batch.upserts.items()
            if worker_id not in batch.started_jobs and not owns_work(plain)
        ]
        over += list(batch.deletes)
        conn.executemany("DELETE FROM jobs WHERE worker_id = ?", [(w,) for w in over])
        conn.executemany(
            "INSERT INTO jobs (worker_id, job_id, replica) VALUES (?, ?, ?) "
            "ON CONFLICT (worker_id) DO UPDATE SET job_id = excluded.job_id, "
            "replica = excluded.replica",
            [(worker_id, job_id, self.replica) for worker_id, job_id in batch.started_jobs.items()],
        )

    def _beat(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Record this replica as seen ``now``, forget the replicas gone for ten leases (with
        their drain records), and return the live ones."""
        conn.execute(
            "INSERT INTO replicas (replica, started_at, seen_at) VALUES (?, ?, ?) "
            "ON CONFLICT (replica) DO UPDATE SET seen_at = excluded.seen_at",
            (self.replica, now, now),
        )
        gone = now - 10 * self.replica_lease_secs
        conn.execute(
            "DELETE FROM drain_idle WHERE replica IN "
            "(SELECT replica FROM replicas WHERE seen_at < ?)",
            (gone,),
        )
        conn.execute("DELETE FROM replicas WHERE seen_at < ?", (gone,))
        rows = conn.execute(
            "SELECT replica FROM replicas WHERE seen_at > ? ORDER BY replica",
            (now - self.replica_lease_secs,),
        ).fetchall()
        return [replica for (replica,) in rows]
