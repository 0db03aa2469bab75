"""Builders shared by the WorkerTable tests: a detection result for an address, and everything a
reader can observe of a table (to check that a refused command changed nothing).

A spec is built with the facade's ``actors.worker_spec``, as a library caller would."""

from __future__ import annotations

import re

from actors.core.model import ConnectionMode, Detection, ModelCard, Runtime
from actors.core.table import WorkerTable
from actors.core.urls import WorkerUrl, parse_worker_url

# The shape of every worker id: a lowercase, hyphenated UUID.
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def detection(
    url: str | WorkerUrl,
    *models: str,
    mode: ConnectionMode = ConnectionMode.HTTP,
    runtime: Runtime = Runtime.VLLM,
) -> Detection:
    """What a successful detection of ``url`` reports: the scheme the probe chose (grpc for a
    gRPC worker, else http) unless the address names one, and ``models`` in that order."""
    parsed = url if isinstance(url, WorkerUrl) else parse_worker_url(url)
    scheme = parsed.scheme or ("grpc" if mode is ConnectionMode.GRPC else "http")
    return Detection(
        url=parsed.with_scheme(scheme),
        connection_mode=mode,
        runtime=runtime,
        models=tuple(ModelCard(id=model) for model in models),
    )


def table_state(table: WorkerTable) -> tuple[object, ...]:
    """Everything a reader can observe of the table."""
    snapshot = table.snapshot()
    return (
        len(table),
        dict(table.workers),
        table.indexes.key_index(),
        table.indexes.model_index(),
        table.indexes.type_index(),
        table.indexes.mode_index(),
        snapshot.version,
        dict(snapshot.workers),
        dict(snapshot.by_key),
    )
