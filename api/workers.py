"""The /workers routes: translate HTTP into Gateway calls and back, nothing more."""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from quart import Blueprint, Response, jsonify, request

from actors.core.errors import GatewayError, InvalidInput
from actors.core.model import WorkerStatus, WorkerType
from actors.core.snapshot import count_stats
from actors.registry.service import Gateway
from api.longpoll import TIMED_OUT_HEADER, parse_wait, wait_for_status
from api.render import error_body, render_accepted, render_worker
from api.schemas import load_json_object, parse_worker_patch, parse_worker_spec

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
FILTERS = ("model", "status", "worker_type")


def workers_blueprint(gateway: Gateway, *, admin_api_key: str | None) -> Blueprint:
    workers = Blueprint("workers", __name__)

    @workers.before_request
    async def require_admin() -> tuple[Response, int, dict[str, str]] | None:
        if admin_api_key is None or request.method not in MUTATING:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            body = error_body("this route needs Authorization: Bearer <admin key>", "UNAUTHORIZED")
            return jsonify(body), 401, {"WWW-Authenticate": "Bearer"}
        if not hmac.compare_digest(token.strip().encode(), admin_api_key.encode()):
            return jsonify(error_body("the admin key is not valid", "FORBIDDEN")), 403, {}
        return None

    def info(worker_id: str) -> dict[str, Any]:
        worker = gateway.get_worker(worker_id)
        return render_worker(worker, load=gateway.inflight.count(worker.id))

    @workers.post("/workers")
    async def create() -> tuple[Response, int, dict[str, str]]:
        spec = parse_worker_spec(await _json_body())
        worker = await gateway.add_worker(spec)
        body = render_accepted(worker, f"Worker registration queued; poll GET /workers/{worker.id}")
        return jsonify(body), 202, {"Location": f"/workers/{worker.id}"}

    @workers.get("/workers")
    async def list_all() -> Response:
        args = request.args
        for name in args:
            if name not in FILTERS:
                raise InvalidInput(
                    name, f"unknown query parameter (accepted: {', '.join(FILTERS)})"
                )
        found = gateway.list_workers(
            model=args.get("model"),
            status=_enum(WorkerStatus, "status", args.get("status")),
            worker_type=_enum(WorkerType, "worker_type", args.get("worker_type")),
        )
        rendered = [render_worker(w, load=gateway.inflight.count(w.id)) for w in found]
        return jsonify({"workers": rendered, "total": len(found), "stats": count_stats(found)})

    @workers.get("/workers/<worker_id>")
    async def get_one(worker_id: str) -> tuple[Response, int, dict[str, str]]:
        worker_id = _worker_id(worker_id)
        wait = parse_wait(request.args)  # ?wait_for=&timeout_secs=: the long-poll
        await gateway.find_worker(worker_id)  # replicas: an id another one just returned
        headers: dict[str, str] = {}
        if wait is not None:
            _, timed_out = await wait_for_status(gateway, worker_id, wait.status, wait.timeout)
            if timed_out:
                headers[TIMED_OUT_HEADER] = "true"
        body = info(worker_id)
        return jsonify(body), 200, {"ETag": f'"{body["spec_version"]}"', **headers}

    @workers.put("/workers/<worker_id>")
    async def replace(worker_id: str) -> tuple[Response, int, dict[str, str]]:
        worker_id = _worker_id(worker_id)
        spec = parse_worker_spec(await _json_body())
        worker = await gateway.replace_worker(worker_id, spec, if_match=_if_match())
        message = "Worker replacement queued; the current spec serves until detection succeeds"
        return jsonify(render_accepted(worker, message)), 202, {"Location": f"/workers/{worker.id}"}

    @workers.patch("/workers/<worker_id>")
    async def update(worker_id: str) -> tuple[Response, int, dict[str, str]]:
        worker_id = _worker_id(worker_id)
        patch = parse_worker_patch(await _json_body())
        worker = await gateway.update_worker(worker_id, patch, if_match=_if_match())
        body = render_worker(worker, load=gateway.inflight.count(worker.id))
        return jsonify(body), 200, {"ETag": f'"{worker.spec_version}"'}

    @workers.delete("/workers/<worker_id>")
    async def delete(worker_id: str) -> tuple[Response, int]:
        worker = await gateway.remove_worker(_worker_id(worker_id))
        if worker.status is WorkerStatus.DRAINING:
            message = "Worker is draining: no new requests; it is removed once idle"
        else:
            message = f"Worker removed ({worker.status.value}: its registration was cancelled)"
        body = render_accepted(worker, message)
        body["worker_status"] = (
            "draining" if gateway.snapshot.get(worker.id) is not None else "removed"
        )
        return jsonify(body), 202

    @workers.post("/workers/<worker_id>/retry")
    async def retry(worker_id: str) -> tuple[Response, int, dict[str, str]]:
        worker_id = _worker_id(worker_id)
        if (await request.get_data(as_text=False)).strip() not in (b"", b"{}"):
            raise InvalidInput("", "POST /workers/{id}/retry takes no body")
        worker = await gateway.retry_worker(worker_id)
        body = render_accepted(worker, "Registration retry queued")
        return jsonify(body), 202, {"Location": f"/workers/{worker.id}"}

    return workers


async def _json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(request.mimetype)
    return load_json_object(await request.get_data(as_text=False))


class UnsupportedMediaType(GatewayError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415

    def __init__(self, mimetype: str) -> None:
        got = f"Content-Type {mimetype}" if mimetype else "no Content-Type"
        super().__init__(f"the body must be sent with Content-Type: application/json, not {got}")


def _worker_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise InvalidInput("worker_id", f"{raw[:80]!r} is not a UUID") from None


def _enum(kind: type[WorkerStatus] | type[WorkerType], name: str, raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise InvalidInput(name, f"must be one of {allowed}, not {raw[:80]!r}") from None


def _if_match() -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise InvalidInput("If-Match", f'must be an ETag like "3", not {raw[:40]!r}')
    return int(text)
