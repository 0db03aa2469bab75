"""The inference routes as a raw ASGI fast path in front of the Quart app.

``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/generate`` and
``GET /v1/models`` are matched on ``scope["path"]`` and served here without Quart (whose cost per
request would dominate, DESIGN.md section 4); everything else goes to the Quart app. The body is
read once, ``model`` (and the routing key) extracted, and the original bytes forwarded unchanged.
Errors use the OpenAI shape ``{"error": {"type", "code", "message", "param"}}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from actors.proxy import DataPlane, Headers, ProxyRequest, Refusal
from actors.routing import RouteRequest
from actors.service import Gateway
from actors.upstream import UpstreamError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

POST_ROUTES = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate"))
MAX_BODY_BYTES = 32 * 1024 * 1024
JSON_HEADERS = [(b"content-type", b"application/json")]
log = logging.getLogger("tmg.inference")


def inference_app(gateway: Gateway, fallback: ASGIApp) -> ASGIApp:
    dataplane = gateway.dataplane
    wants_prompt = dataplane.router.policy == "cache_aware"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in POST_ROUTES:
                if scope["method"] != "POST":
                    return await _error(send, 405, "method_not_allowed", f"use POST {path}")
                return await _proxy(dataplane, scope, receive, send, wants_prompt)
            if path == "/v1/models" and scope["method"] == "GET":
                return await _send_json(send, 200, _models(gateway))
        await fallback(scope, receive, send)

    return app


class _AsgiResponder:
    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def start(self, status: int, headers: Headers) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


async def _proxy(
    dataplane: DataPlane, scope: Scope, receive: Receive, send: Send, wants_prompt: bool
) -> None:
    body = await _read_body(receive)
    if body is None:
        return await _error(
            send, 413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes"
        )
    try:
        data = json.loads(body)
    except ValueError:
        return await _error(send, 400, "invalid_json", "the body is not valid JSON")
    if not isinstance(data, dict):
        return await _error(send, 400, "invalid_json", "the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        message = "'model' is required" if model is None else "'model' must be a non-empty string"
        return await _error(send, 400, "missing_required_parameter", message, param="model")
    session = accept = None
    for name, value in scope["headers"]:
        if name == b"x-session-id":
            session = value.decode("latin-1")
        elif name == b"accept":
            accept = value
    if session is None and isinstance(user := data.get("user"), str):
        session = user
    route = RouteRequest(
        model=model, session_key=session, prompt=_prompt(data) if wants_prompt else None
    )
    request = ProxyRequest(
        path=scope["raw_path"] or scope["path"].encode(),
        body=body,
        route=route,
        accept=accept,
    )
    if data.get("stream") is True:  # a client leaving mid-stream cancels the upstream request
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            refusal = await _forward(dataplane, request, send)
            nursery.cancel_scope.cancel()
    else:  # a plain answer is short to forward: no watcher task (it costs ~5% of the CPU)
        refusal = await _forward(dataplane, request, send)
    if refusal is not None:
        await _refuse(send, refusal)


async def _forward(dataplane: DataPlane, request: ProxyRequest, send: Send) -> Refusal | None:
    try:
        return await dataplane.forward(request, _AsgiResponder(send))
    except UpstreamError as error:  # the answer had started: the stream is cut short
        log.info("stream from a worker broke: %s", error)
        return None


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """A client that goes away cancels its upstream request."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # disconnected: what there is
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _prompt(data: dict[str, Any]) -> str | None:
    """The text cache-aware routing matches on: the prompt, or the messages' contents."""
    if isinstance(prompt := data.get("prompt") or data.get("text"), str):
        return prompt
    messages = data.get("messages")
    if not isinstance(messages, list):
        return None
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return "\n".join(parts)


def _models(gateway: Gateway) -> dict[str, Any]:
    snapshot = gateway.snapshot
    data = []
    for model in sorted(snapshot.by_model):
        runtime = snapshot.ready_for_model(model)[0].runtime
        owner = runtime.value if runtime is not None else "unknown"
        data.append({"id": model, "object": "model", "created": 0, "owned_by": owner})
    return {"object": "list", "data": data}


async def _refuse(send: Send, refusal: Refusal) -> None:
    headers = [(b"retry-after", str(refusal.retry_after).encode())] if refusal.retry_after else []
    await _error(send, refusal.status, refusal.code, refusal.message, extra=headers)


async def _error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    extra: Headers | None = None,
) -> None:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"type": kind, "code": code, "message": message, "param": param}}
    await _send_json(send, status, body, extra)


async def _send_json(send: Send, status: int, body: object, extra: Headers | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [*JSON_HEADERS, (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
