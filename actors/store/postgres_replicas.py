"""The replicas' records in PostgreSQL, beside the registry's data (``postgres.py``): who is
alive (heartbeats), who has nothing in flight to a draining worker, who runs each job, and who
holds each lease. ``PostgresReplicas`` is the half of ``PostgresStore`` that keeps them; the
other half (the workers and the change log) is in ``postgres.py``, whose docstring explains
both.

A replica is live while its last heartbeat is younger than ``replica_lease_secs``; that lease is
also the lease of every job it runs (``claim_jobs``) and of its drain records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from actors.store.base import Batch, owns_work

T = TypeVar("T")


class PostgresReplicas:
    """Heartbeats, drain records, job records and leases (see the module docstring). The
    store provides ``replica``, ``replica_lease_secs`` and ``_call`` (run a function with the
    connection, turning database errors into ``StoreError``)."""

    replica: str
    replica_lease_secs: float

    def _call(self, function: Callable[[psycopg.Connection[Any]], T]) -> T:
        raise NotImplementedError

    def heartbeat(self) -> list[str]:
        def beat(conn: psycopg.Connection[Any]) -> list[str]:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO tmg_replicas (replica) VALUES (%s) ON CONFLICT (replica) "
                    "DO UPDATE SET seen_at = now()",
                    (self.replica,),
                )
                rows = conn.execute(
                    "SELECT replica FROM tmg_replicas "
                    "WHERE seen_at > now() - make_interval(secs => %s) ORDER BY replica",
                    (self.replica_lease_secs,),
                ).fetchall()
                gone = "now() - make_interval(secs => %s)"
                conn.execute(
                    "DELETE FROM tmg_drain_idle WHERE replica IN (SELECT replica FROM "
                    f"tmg_replicas WHERE seen_at < {gone})",
                    (10 * self.replica_lease_secs,),
                )
                conn.execute(
                    f"DELETE FROM tmg_replicas WHERE seen_at < {gone}",
                    (10 * self.replica_lease_secs,),
                )
            return [replica for (replica,) in rows]

        return self._call(beat)

    def record_idle(self, worker_id: str) -> bool:
        def record(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                # the worker's row lock orders the replicas recording it: the last one sees
                # every other record (and finishes the drain), none waits for a poll
                locked = conn.execute(
                    "SELECT 1 FROM tmg_workers WHERE id = %s FOR UPDATE", (worker_id,)
                ).fetchone()
                if locked is None:
                    return True  # gone already: nothing to wait for
                conn.execute(
                    "INSERT INTO tmg_drain_idle (worker_id, replica) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (worker_id, self.replica),
                )
                row = conn.execute(
                    "SELECT count(*) FROM tmg_replicas r WHERE r.seen_at > now() - "
                    "make_interval(secs => %s) AND NOT EXISTS (SELECT 1 FROM tmg_drain_idle d "
                    "WHERE d.worker_id = %s AND d.replica = r.replica)",
                    (self.replica_lease_secs, worker_id),
                ).fetchone()
            return row is not None and row[0] == 0

        return self._call(record)

    def join(self) -> None:
        """Start as a replica: a heartbeat, and any job still recorded under this replica's
        name (from before a restart: nothing runs here yet) is left for anyone to claim."""
        self.heartbeat()
        self._call(
            lambda conn: conn.execute(
                "UPDATE tmg_jobs SET replica = '' WHERE replica = %s", (self.replica,)
            )
        )

    def claim_jobs(self, limit: int) -> list[tuple[str, int]]:
        def claim(conn: psycopg.Connection[Any]) -> list[tuple[str, int]]:
            with conn.transaction():
                rows = conn.execute(
                    "SELECT j.worker_id, j.job_id FROM tmg_jobs j "
                    "WHERE j.replica <> %s AND NOT EXISTS (SELECT 1 FROM tmg_replicas r "
                    "WHERE r.replica = j.replica "
                    "AND r.seen_at > now() - make_interval(secs => %s)) "
                    "ORDER BY j.worker_id LIMIT %s FOR UPDATE OF j SKIP LOCKED",
                    (self.replica, self.replica_lease_secs, limit),
                ).fetchall()
                if rows:
                    conn.execute(
                        "UPDATE tmg_jobs SET replica = %s WHERE worker_id = ANY(%s)",
                        (self.replica, [worker_id for worker_id, _ in rows]),
                    )
            return [(worker_id, int(job_id)) for worker_id, job_id in rows]

        return self._call(claim)

    def release_job(self, worker_id: str, job_id: int) -> None:
        self._call(
            lambda conn: conn.execute(
                "DELETE FROM tmg_jobs WHERE worker_id = %s AND job_id = %s", (worker_id, job_id)
            )
        )

    def hold_lease(self, name: str) -> bool:
        def hold(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(
                "INSERT INTO tmg_leases (name, replica, until) "
                "VALUES (%s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (name) DO UPDATE SET replica = excluded.replica, "
                "until = excluded.until "
                "WHERE tmg_leases.replica = excluded.replica OR tmg_leases.until < now() "
                "RETURNING replica",
                (name, self.replica, self.replica_lease_secs),
            ).fetchone()
            return row is not None

        return self._call(hold)

    # ---- the feed ----------------------------------------------------------------------

    def _record_jobs(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        over = [
            worker_id
            for worker_id, plain in batch.upserts.items()
            if worker_id not in batch.started_jobs and not owns_work(plain)
        ]
        over += list(batch.deletes)
        if over:
            conn.execute("DELETE FROM tmg_jobs WHERE worker_id = ANY(%s)", (over,))
        for worker_id, job_id in batch.started_jobs.items():
            conn.execute(
                "INSERT INTO tmg_jobs (worker_id, job_id, replica) VALUES (%s, %s, %s) "
                "ON CONFLICT (worker_id) DO UPDATE SET job_id = excluded.job_id, "
                "replica = excluded.replica",
                (worker_id, job_id, self.replica),
            )
