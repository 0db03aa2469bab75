"""The gateway's tables in PostgreSQL (``postgres.py``'s docstring describes the layout): the
statements that create them, their version, and the advisory lock under which a replica
creates or checks them (so replicas starting together do it once)."""

from __future__ import annotations

SCHEMA_VERSION = 1
SCHEMA_LOCK = 0x544D4753  # advisory lock key while creating or migrating the schema

SCHEMA = (
    """CREATE TABLE tmg_meta (
        id integer PRIMARY KEY CHECK (id = 1),
        schema_version integer NOT NULL,
        change_seq bigint NOT NULL,
        id_prefix text,
        id_high_water bigint NOT NULL,
        next_job_id bigint NOT NULL
    )""",
    """CREATE TABLE tmg_workers (
        id text PRIMARY KEY,
        identity_key text NOT NULL UNIQUE,
        spec_version bigint NOT NULL,
        data text NOT NULL
    )""",
    "CREATE TABLE tmg_worker_ids (id text PRIMARY KEY)",
    """CREATE TABLE tmg_changes (
        seq bigint PRIMARY KEY,
        replica text NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT now(),
        payload text NOT NULL
    )""",
    """CREATE TABLE tmg_replicas (
        replica text PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        seen_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE tmg_drain_idle (
        worker_id text NOT NULL,
        replica text NOT NULL,
        PRIMARY KEY (worker_id, replica)
    )""",
    """CREATE TABLE tmg_jobs (
        worker_id text PRIMARY KEY,
        job_id bigint NOT NULL,
        replica text NOT NULL
    )""",
    """CREATE TABLE tmg_leases (
        name text PRIMARY KEY,
        replica text NOT NULL,
        until timestamptz NOT NULL
    )""",
    "INSERT INTO tmg_meta VALUES (1, 1, 0, NULL, 0, 1)",
)
