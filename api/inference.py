"""The inference routes as a raw ASGI fast path in front of the Quart app.

``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/generate`` and
``GET /v1/models`` are matched on ``scope["path"]`` and served here without Quart (whose cost per
request would dominate, DESIGN.md section 4); everything else goes to the Quart app. The body is
read once, ``model`` (and the routing key) extracted, and the original bytes forwarded unchanged.
Errors use the OpenAI shape ``{"error": {"type", "code", "message", "param"}}``.

**Loops.** Every answer this app makes itself (``/v1/models``, every error) carries
``x-tmg-gateway: <instance_id>``, so detection can tell that a "worker" is this gateway. Every
proxied request carries ``x-tmg-via``: the incoming hop list with this gateway's id appended. A
request whose list already names this gateway, or holds more than ``MAX_HOPS`` hops, is refused
with 508 ``loop_detected`` before it is routed: a gateway registered as its own worker (or two
pointing at each other) answers one 508 instead of recursing until it runs out of descriptors.

**Deep JSON.** ``json.loads`` recurses once per nesting level and raises RecursionError near the
interpreter's recursion limit (about 1,000 levels): that is the depth limit, caught and answered
with a 400. No pre-scan of the body: the hot path pays nothing for it.

**Disconnects.** A client that goes away cancels its upstream request, streaming or not. A
server that does this itself (ours: it cancels the app call when the connection ends) says so
with the ``tmg.cancel_on_disconnect`` scope extension, and then no watcher task is started; on
other servers (hypercorn) one task per request waits for ``http.disconnect`` and cancels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from actors.dataplane.proxy import LOOP_DETECTED, Headers, ProxyRequest, Refusal
from actors.dataplane.requests import ROUTES, BadInferenceRequest, parse_body, route_for
from actors.dataplane.routing import PROMPT_POLICIES
from actors.dataplane.upstream.pool import UpstreamError
from actors.registry.service import Gateway

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_HOPS = 8  # gateways a request may already have passed through
CANCEL_ON_DISCONNECT = "tmg.cancel_on_disconnect"  # the server cancels the app call itself
log = logging.getLogger("tmg.inference")


def inference_app(gateway: Gateway, fallback: ASGIApp) -> ASGIApp:
    return _InferenceApp(gateway, fallback)


class _InferenceApp:
    """The ASGI app; what every request needs is computed once, here."""

    __slots__ = ("_fallback", "_forward_request", "_gateway", "_id", "_json", "_wants_prompt")

    def __init__(self, gateway: Gateway, fallback: ASGIApp) -> None:
        self._gateway = gateway
        self._fallback = fallback
        self._forward_request = gateway.forward
        self._wants_prompt = gateway.config.policy in PROMPT_POLICIES
        self._id = gateway.config.instance_id.encode("ascii")
        self._json: Headers = [(b"content-type", b"application/json"), (b"x-tmg-gateway", self._id)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in ROUTES:
                if scope["method"] != "POST":
                    return await self._error(send, 405, "method_not_allowed", f"use POST {path}")
                return await self._proxy(scope, receive, send)
            if path == "/v1/models" and scope["method"] == "GET":
                return await self._send_json(send, 200, _models(self._gateway))
        await self._fallback(scope, receive, send)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = accept = via = None
        for name, value in scope["headers"]:
            if name == b"x-session-id":
                session = value.decode("latin-1")
            elif name == b"accept":
                accept = value
            elif name == b"x-tmg-via":
                via = value if via is None else via + b"," + value
        if via is None:
            via = self._id
        else:
            hops = via.split(b",")
            if len(hops) > MAX_HOPS or any(hop.strip() == self._id for hop in hops):
                message = (
                    "the request has already passed through this gateway "
                    f"or through more than {MAX_HOPS} gateways (x-tmg-via)"
                )
                return await self._error(send, LOOP_DETECTED, "loop_detected", message)
            via += b", " + self._id
        body = await _read_body(receive)
        if body is None:
            return await self._error(
                send, 413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes"
            )
        try:
            data = parse_body(body)
            route = route_for(data, session_key=session, wants_prompt=self._wants_prompt)
        except BadInferenceRequest as bad:
            return await self._error(send, bad.status, bad.code, bad.message, param=bad.param)
        request = ProxyRequest(
            path=scope["raw_path"] or scope["path"].encode(),
            body=body,
            route=route,
            accept=accept,
            via=via,
        )
        refusal: Refusal | None = None
        extensions = scope.get("extensions")
        if extensions is not None and CANCEL_ON_DISCONNECT in extensions:
            refusal = await self._forward(request, send)  # the server cancels us on disconnect
        else:  # a client leaving cancels the upstream request: a watcher task does it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                refusal = await self._forward(request, send)
                nursery.cancel_scope.cancel()
        if refusal is not None:
            headers = None
            if refusal.retry_after is not None:
                headers = [(b"retry-after", str(refusal.retry_after).encode())]
            await self._error(send, refusal.status, refusal.code, refusal.message, extra=headers)

    async def _forward(self, request: ProxyRequest, send: Send) -> Refusal | None:
        try:
            return await self._forward_request(request, _AsgiResponder(send))
        except UpstreamError as error:  # the answer had started: it stays unfinished, and
            log.info("answer from a worker broke off: %s", error)  # the server cuts it
            return None

    async def _error(
        self,
        send: Send,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        extra: Headers | None = None,
    ) -> None:
        # 429 (every worker tried was busy) is the servers' state, not the request's fault
        kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
        body = {"error": {"type": kind, "code": code, "message": message, "param": param}}
        await self._send_json(send, status, body, extra)

    async def _send_json(
        self, send: Send, status: int, body: object, extra: Headers | None = None
    ) -> None:
        data = json.dumps(body).encode()
        headers = [*self._json, (b"content-length", b"%d" % len(data)), *(extra or ())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})


class _AsgiResponder:
    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def start(self, status: int, headers: Headers) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


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


def _models(gateway: Gateway) -> dict[str, Any]:
    snapshot = gateway.snapshot
    data = []
    for model in sorted(snapshot.by_model):
        runtime = snapshot.ready_for_model(model)[0].runtime
        owner = runtime.value if runtime is not None else "unknown"
        data.append({"id": model, "object": "model", "created": 0, "owned_by": owner})
    return {"object": "list", "data": data}
