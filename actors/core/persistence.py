"""Dump a WorkerTable to plain JSON-able data and restore it (pure).

A dump keeps everything needed to carry on after a restart, worker ``api_key``s included:
whoever stores one must protect it like a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actors.core import codec
from actors.core.table import WorkerTable


def dump_table(table: WorkerTable) -> dict[str, Any]:
    return {
        "format": codec.FORMAT,
        "next_job_id": table.next_job_id,
        "workers": [codec.worker_to_plain(worker) for worker in table.workers.values()],
    }


def restore_table(data: Mapping[str, Any], *, now: float, **options: Any) -> WorkerTable:
    """A table holding a dump's workers. Work that was in progress restarts: a pending
    worker's registration is queued again (its StartJob is in ``take_effects()``), a PUT that
    had not swapped in yet is recorded as cancelled (the old spec kept serving), and a
    draining worker is dropped (after a restart nothing is in flight)."""
    if data.get("format") != codec.FORMAT:
        raise ValueError(f"unknown registry dump format {data.get('format')!r}")
    table = WorkerTable(first_job_id=int(data["next_job_id"]), **options)
    for plain in data["workers"]:
        table.adopt(codec.worker_from_plain(plain), now=now)
    return table
