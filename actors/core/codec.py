"""The registry in plain, JSON-able data (pure): each record's plain form, and a whole
WorkerTable dumped and restored.

Unlike the API's rendering, a dump keeps everything needed to carry on after a restart, worker
``api_key``s included: whoever stores a dump must protect it like a secret.

A stored worker (``stored_worker``: what the store keeps per worker, and a dump's entries) is
``worker_to_plain`` plus, while a PUT of it is being detected, ``"replacing"``: the spec the PUT
sent, so that a restart can run that replacement again (``restore_workers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any, TypeVar

from actors.core.model import (
    ConnectionMode,
    Detection,
    HealthConfig,
    JobState,
    JobStatus,
    JobType,
    ModelCard,
    Runtime,
    Worker,
    WorkerSpec,
    WorkerStatus,
    WorkerType,
)
from actors.core.table import WorkerTable
from actors.core.urls import parse_worker_url

FORMAT = 1
T = TypeVar("T")
R = TypeVar("R")


# ---- a whole table ---------------------------------------------------------------------------


def dump_table(table: WorkerTable) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "next_job_id": table.next_job_id,
        "workers": [stored_worker(table, worker_id) for worker_id in table.workers],
    }


def restore_table(data: Mapping[str, Any], *, now: float, **options: Any) -> WorkerTable:
    """A table holding a dump's workers. Work that was in progress restarts: a pending
    worker's registration is queued again (its StartJob is in ``take_effects()``), a PUT that
    had not swapped in yet is recorded as cancelled (the old spec kept serving), and a
    draining worker is dropped (after a restart nothing is in flight)."""
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown registry dump format {data.get('format')!r}")
    return restore_workers(
        data["workers"], now=now, first_job_id=int(data["next_job_id"]), **options
    )


def restore_workers(
    workers: Iterable[Mapping[str, Any]], *, now: float, **options: Any
) -> WorkerTable:
    """A table (``WorkerTable(**options)``) holding stored workers, adopted as ``restore_table``
    says, with any replacement in progress run again. ``take_changes()`` then holds what the
    recovery changed (restarted jobs, dropped draining workers) for the store;
    ``take_effects()`` the jobs to start."""
    table = WorkerTable(**options)
    for plain in workers:
        replacing = plain.get("replacing")
        table.adopt(
            worker_from_plain(plain),
            now=now,
            replacement=None if replacing is None else spec_from_plain(replacing),
        )
    return table


def stored_worker(table: WorkerTable, worker_id: str) -> dict[str, Any]:
    """What a store keeps of one worker of ``table``: its plain form, plus the spec a PUT of it
    is detecting (``"replacing"``) while there is one."""
    plain = worker_to_plain(table.workers[worker_id])
    replacement = table.replacement(worker_id)
    if replacement is not None:
        plain["replacing"] = spec_to_plain(replacement)
    return plain


# ---- one record at a time --------------------------------------------------------------------


def worker_to_plain(worker: Worker) -> dict[str, Any]:
    return {
        "id": worker.id,
        "spec": spec_to_plain(worker.spec),
        "status": worker.status.value,
        "created_at": worker.created_at,
        "updated_at": worker.updated_at,
        "spec_version": worker.spec_version,
        "is_healthy": worker.is_healthy,
        "detection": _optional(_detection_to_plain, worker.detection),
        "job": _optional(_job_to_plain, worker.job),
    }


def worker_from_plain(data: Mapping[str, Any]) -> Worker:
    return Worker(
        id=data["id"],
        spec=spec_from_plain(data["spec"]),
        status=WorkerStatus(data["status"]),
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        spec_version=data["spec_version"],
        is_healthy=data["is_healthy"],
        detection=_optional(_detection_from_plain, data["detection"]),
        job=_optional(_job_from_plain, data["job"]),
    )


def spec_to_plain(spec: WorkerSpec) -> dict[str, Any]:
    return {
        "url": spec.url.text,
        "model_id": spec.model_id,
        "worker_type": spec.worker_type.value,
        "bootstrap_port": spec.bootstrap_port,
        "runtime": _optional(str, spec.runtime),  # a StrEnum: str() is its value
        "priority": spec.priority,
        "cost": spec.cost,
        "labels": dict(spec.labels),
        "api_key": spec.api_key,
        "health": asdict(spec.health),
        "max_connection_attempts": spec.max_connection_attempts,
        "registration_timeout_secs": spec.registration_timeout_secs,
        "recheck_interval_secs": spec.recheck_interval_secs,
        "drain_timeout_secs": spec.drain_timeout_secs,
    }


def spec_from_plain(data: Mapping[str, Any]) -> WorkerSpec:
    return WorkerSpec(
        **{
            **data,
            "url": parse_worker_url(data["url"]),
            "worker_type": WorkerType(data["worker_type"]),
            "runtime": _optional(Runtime, data["runtime"]),
            "health": HealthConfig(**data["health"]),
        }
    )


def _detection_to_plain(detection: Detection) -> dict[str, Any]:
    return {
        "url": detection.url.text,
        "connection_mode": detection.connection_mode.value,
        "runtime": detection.runtime.value,
        "models": [{"id": m.id, "details": dict(m.details)} for m in detection.models],
        "labels": dict(detection.labels),
    }


def _detection_from_plain(data: Mapping[str, Any]) -> Detection:
    return Detection(
        url=parse_worker_url(data["url"]),
        connection_mode=ConnectionMode(data["connection_mode"]),
        runtime=Runtime(data["runtime"]),
        models=tuple(ModelCard(**model) for model in data["models"]),
        labels=data["labels"],
    )


def _job_to_plain(job: JobStatus) -> dict[str, Any]:
    return {**asdict(job), "job_type": job.job_type.value, "state": job.state.value}


def _job_from_plain(data: Mapping[str, Any]) -> JobStatus:
    return JobStatus(
        **{**data, "job_type": JobType(data["job_type"]), "state": JobState(data["state"])}
    )


def _optional(convert: Callable[[T], R], value: T | None) -> R | None:
    return None if value is None else convert(value)
