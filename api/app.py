"""create_app(gateway): the Quart-Trio application. Domain errors map to statuses here, once."""

from __future__ import annotations

import logging

from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.core.errors import GatewayError
from actors.registry.service import Gateway
from api.docs import docs_blueprint
from api.health import health_blueprint
from api.render import error_body, render_error
from api.workers import workers_blueprint

MAX_BODY_BYTES = 1024 * 1024
log = logging.getLogger("tmg.api")


def create_app(gateway: Gateway, *, admin_api_key: str | None = None) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(workers_blueprint(gateway, admin_api_key=admin_api_key))
    app.register_blueprint(health_blueprint(gateway))
    app.register_blueprint(docs_blueprint())
    app.register_error_handler(GatewayError, _render_gateway_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_crash)
    instance = gateway.config.instance_id

    @app.after_request
    async def _mark(response: Response) -> Response:
        # who answered: detection refuses a worker that answers as this very gateway (a loop)
        response.headers["x-tmg-gateway"] = instance
        return response

    return app


async def _render_gateway_error(error: GatewayError) -> tuple[Response, int]:
    return jsonify(render_error(error)), error.status


async def _render_http_error(error: HTTPException) -> tuple[Response, int, dict[str, str]]:
    status = error.code or 500
    code = {413: "PAYLOAD_TOO_LARGE", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(
        status, (error.name or "error").upper().replace(" ", "_")
    )
    message = error.description or error.name
    if status == 413:
        message = f"the body is larger than {MAX_BODY_BYTES} bytes"
    headers = {}
    if status == 405 and (allowed := getattr(error, "valid_methods", None)):
        headers["Allow"] = ", ".join(allowed)
    return jsonify(error_body(message, code)), status, headers


async def _render_crash(error: Exception) -> tuple[Response, int]:
    log.exception("unhandled error", exc_info=error)
    return jsonify(error_body("internal error; see the gateway's log", "INTERNAL_ERROR")), 500
