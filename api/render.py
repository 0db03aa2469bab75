"""Domain values → JSON bodies. The worker's api_key is never rendered."""

from __future__ import annotations

from typing import Any

from actors.core.errors import GatewayError
from actors.core.model import JobStatus, Worker


def render_worker(worker: Worker, *, load: int = 0) -> dict[str, Any]:
    spec = worker.spec
    models = worker.detection.models if worker.detection is not None else ()
    mode = worker.connection_mode
    return {
        "id": worker.id,
        "url": worker.url.text,
        "model_id": spec.model_id or (models[0].id if models else None),
        "models": [{**model.details, "id": model.id} for model in models],
        "worker_type": spec.worker_type.value,
        "connection_mode": mode.value if mode is not None else None,
        "runtime_type": worker.runtime.value if worker.runtime is not None else "unspecified",
        "labels": worker.labels,
        "priority": spec.priority,
        "cost": spec.cost,
        "bootstrap_port": spec.bootstrap_port,
        "status": worker.status.value,
        "is_healthy": worker.is_healthy,
        "load": load,
        "job_status": render_job(worker.job),
        "created_at": worker.created_at,
        "updated_at": worker.updated_at,
        "spec_version": worker.spec_version,
        "max_connection_attempts": spec.max_connection_attempts,
        "registration_timeout_secs": spec.registration_timeout_secs,
        "recheck_interval_secs": spec.recheck_interval_secs,
        "drain_timeout_secs": spec.drain_timeout_secs,
        "health": {
            "timeout_secs": spec.health.timeout_secs,
            "check_interval_secs": spec.health.check_interval_secs,
            "failure_threshold": spec.health.failure_threshold,
            "success_threshold": spec.health.success_threshold,
            "disable": spec.health.disable,
            "drain_settle_secs": spec.health.drain_settle_secs,
        },
    }


def render_job(job: JobStatus | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {
        "job_type": job.job_type.value,
        "status": job.state.value,
        "message": job.message,
        "attempts": job.attempts,
        "updated_at": job.updated_at,
    }


def render_accepted(worker: Worker, message: str) -> dict[str, Any]:
    return {
        "status": "accepted",
        "worker_id": worker.id,
        "url": worker.url.text,
        "location": f"/workers/{worker.id}",
        "message": message,
    }


def render_error(error: GatewayError) -> dict[str, Any]:
    """smg's management error shape: ``{"error": sentence, "code": CODE, ...context}``."""
    return {"error": error.message, "code": error.code, **error.context}


def error_body(message: str, code: str, **context: Any) -> dict[str, Any]:
    return {"error": message, "code": code, **context}
