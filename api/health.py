"""The gateway's own probes: /health, /liveness, /readiness, and /metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, jsonify

from actors.registry.service import Gateway


def health_blueprint(gateway: Gateway) -> Blueprint:
    probes = Blueprint("health", __name__)

    @probes.get("/health")
    @probes.get("/liveness")
    async def alive() -> Response:
        return Response("OK", content_type="text/plain; charset=utf-8")

    @probes.get("/readiness")
    async def ready() -> tuple[Response, int]:
        routable = [w for w in gateway.snapshot.workers.values() if w.is_routable]
        if routable:
            return jsonify({"status": "ready", "healthy_workers": len(routable)}), 200
        body = {"status": "not ready", "reason": "no worker is ready and healthy"}
        return jsonify(body), 503

    @probes.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    return probes
