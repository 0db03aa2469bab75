"""Plain, JSON-able forms of the registry's records (pure), for dumping and restoring a table.

Unlike the API's rendering, a dump keeps everything needed to carry on after a restart, worker
``api_key``s included: whoever stores a dump must protect it like a secret.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

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
from actors.core.urls import parse_worker_url

FORMAT = 1


def spec_to_plain(spec: WorkerSpec) -> dict[str, Any]:
    return {
        "url": spec.url.text,
        "model_id": spec.model_id,
        "worker_type": spec.worker_type.value,
        "bootstrap_port": spec.bootstrap_port,
        "runtime": spec.runtime.value if spec.runtime is not None else None,
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


def spec_from_plain(data: dict[str, Any]) -> WorkerSpec:
    fields = dict(data)
    fields["url"] = parse_worker_url(fields["url"])
    fields["worker_type"] = WorkerType(fields["worker_type"])
    fields["runtime"] = None if fields["runtime"] is None else Runtime(fields["runtime"])
    fields["health"] = HealthConfig(**fields["health"])
    return WorkerSpec(**fields)


def worker_to_plain(worker: Worker) -> dict[str, Any]:
    detection = worker.detection
    job = worker.job
    return {
        "id": worker.id,
        "spec": spec_to_plain(worker.spec),
        "status": worker.status.value,
        "created_at": worker.created_at,
        "updated_at": worker.updated_at,
        "spec_version": worker.spec_version,
        "is_healthy": worker.is_healthy,
        "detection": None
        if detection is None
        else {
            "url": detection.url.text,
            "connection_mode": detection.connection_mode.value,
            "runtime": detection.runtime.value,
            "models": [{"id": m.id, "details": dict(m.details)} for m in detection.models],
            "labels": dict(detection.labels),
        },
        "job": None
        if job is None
        else {
            "job_id": job.job_id,
            "job_type": job.job_type.value,
            "state": job.state.value,
            "message": job.message,
            "attempts": job.attempts,
            "updated_at": job.updated_at,
        },
    }


def worker_from_plain(data: dict[str, Any]) -> Worker:
    found = data["detection"]
    job = data["job"]
    detection = None
    if found is not None:
        detection = Detection(
            url=parse_worker_url(found["url"]),
            connection_mode=ConnectionMode(found["connection_mode"]),
            runtime=Runtime(found["runtime"]),
            models=tuple(ModelCard(id=m["id"], details=m["details"]) for m in found["models"]),
            labels=found["labels"],
        )
    return Worker(
        id=data["id"],
        spec=spec_from_plain(data["spec"]),
        status=WorkerStatus(data["status"]),
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        spec_version=data["spec_version"],
        is_healthy=data["is_healthy"],
        detection=detection,
        job=None
        if job is None
        else JobStatus(
            job_id=job["job_id"],
            job_type=JobType(job["job_type"]),
            state=JobState(job["state"]),
            message=job["message"],
            attempts=job["attempts"],
            updated_at=job["updated_at"],
        ),
    )
