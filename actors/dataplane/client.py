"""Inference as a library call: the HTTP data plane's routing, without HTTP.

``request(gateway, path, body)`` and ``stream(gateway, path, body)`` build the same
``ProxyRequest`` the ASGI route builds and hand it to ``gateway.forward`` with an in-memory
``Responder``: routing policy, retries, circuit breakers, in-flight counts (so drains wait for
library calls too) and metrics are exactly those of ``POST /v1/...``. Once service.py has the
hook they are ``gateway.request(...)`` and ``gateway.stream(...)``.

* ``request`` reads the whole answer: ``Answer(status, worker_id, headers, body)``,
  ``.json()``. An answer the worker gave (a 4xx too) is returned as it is; when the gateway
  could not get one, a typed error says why, with the message an HTTP client gets:
  ``ModelNotFound`` (404), ``NoWorkerAvailable`` (503, ``retry_after`` seconds;
  ``GatewayOverloaded`` is one, and so is ``WorkersBusy``: 429 or 503, every worker tried
  answered busy), ``UpstreamFailed`` (502/504: the workers failed, retries used
  up, or the answer broke off), ``InvalidRequest`` (400: no ``model``, not a JSON object, an
  unknown path), and ``InferenceError`` (their base) for the rest (501: gRPC workers only; 508).
* ``stream`` is an async context manager; entering it sends the request and waits for the
  answer's head (refusals raise there), then ``async for data in events`` yields each SSE
  ``data:`` parsed as JSON (a string when it is not JSON) until ``[DONE]``. A worker that
  answers anything but 2xx raises ``WorkerAnswered`` (with the ``Answer``). The body is passed
  through a bounded channel of ``STREAM_BUFFER`` pieces: a consumer that does not read holds
  the upstream, never a growing buffer. Leaving the block before the end cancels the upstream
  request (its connection is closed, so the worker sees the disconnect) and releases the
  worker's in-flight count before ``__aexit__`` returns.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from actors.dataplane.proxy import WORKERS_BUSY, Headers, ProxyRequest, Refusal
from actors.dataplane.requests import ROUTES, BadInferenceRequest, parse_body, route_for
from actors.dataplane.routing import PROMPT_POLICIES
from actors.dataplane.upstream.pool import UpstreamError

if TYPE_CHECKING:
    from actors.registry.service import Gateway

STREAM_BUFFER = 16  # body pieces between the upstream and a stream's consumer
DONE_GRACE_SECS = 1.0  # after [DONE], how long leaving the block waits for the answer's end


class InferenceError(Exception):
    """The gateway could not get an answer from a worker. ``status``/``code``/``message`` are
    what the HTTP route answers (``{"error": {"code", "message"}}``)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(InferenceError, ValueError):
    """400: the request itself is wrong (also a ValueError)."""


class ModelNotFound(InferenceError):
    """404: no worker lists the model, and no registration with an unknown model is running."""


class NoWorkerAvailable(InferenceError):
    """503: workers for the model exist but none can take a request now; retry after
    ``retry_after`` seconds."""


class GatewayOverloaded(NoWorkerAvailable):
    """503: the gateway itself is out of file descriptors."""


class WorkersBusy(NoWorkerAvailable):
    """429 or 503 (``status``, as the workers answered; 503 when they differed): every worker
    tried answered busy; ``retry_after`` is the smallest Retry-After they gave (else 1)."""


class UpstreamFailed(InferenceError):
    """502/504: the chosen workers failed and the retries are used up, or an answer that had
    started broke off."""


class WorkerAnswered(InferenceError):
    """``stream()`` only: the worker answered with a status other than 2xx."""

    def __init__(self, answer: Answer) -> None:
        text = answer.body[:200].decode("utf-8", "replace")
        super().__init__(
            answer.status, "worker_error", f"the worker answered {answer.status}: {text}"
        )
        self.answer = answer


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    worker_id: str | None
    headers: Headers = field(repr=False)
    body: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def error_for(refusal: Refusal) -> InferenceError:
    """The typed error for a refusal, with the HTTP answer's status, code and message."""
    kind: type[InferenceError] = InferenceError
    if refusal.status == 404:
        kind = ModelNotFound
    elif refusal.code == "gateway_overloaded":
        kind = GatewayOverloaded
    elif refusal.code == WORKERS_BUSY:
        kind = WorkersBusy
    elif refusal.status == 503:
        kind = NoWorkerAvailable
    elif refusal.status in (502, 504):
        kind = UpstreamFailed
    elif refusal.status == 400:
        kind = InvalidRequest
    return kind(refusal.status, refusal.code, refusal.message, refusal.retry_after)


def build_request(
    gateway: Gateway,
    path: str,
    body: Mapping[str, Any] | bytes,
    *,
    session_key: str | None = None,
    accept: bytes | None = None,
) -> ProxyRequest:
    """Validate as the HTTP route does, and build the ``ProxyRequest`` it would build."""
    if path not in ROUTES:
        raise InvalidRequest(400, "unknown_route", f"{path!r} is not one of {sorted(ROUTES)}")
    try:
        if isinstance(body, bytes | bytearray | memoryview):
            raw = bytes(body)
            data: Mapping[str, Any] = parse_body(raw)
        elif isinstance(body, Mapping):
            data = body
            try:
                raw = json.dumps(body).encode()
            except (TypeError, ValueError) as error:
                raise BadInferenceRequest(
                    "invalid_json", f"the body is not JSON: {error}"
                ) from None
        else:
            raise BadInferenceRequest("invalid_json", "the body must be a dict or JSON bytes")
        wants_prompt = gateway.config.policy in PROMPT_POLICIES
        route = route_for(data, session_key=session_key, wants_prompt=wants_prompt)
    except BadInferenceRequest as bad:
        raise InvalidRequest(bad.status, bad.code, bad.message) from None
    via = gateway.config.instance_id.encode("ascii")  # loop detection, as over HTTP
    return ProxyRequest(path=path.encode(), body=raw, route=route, accept=accept, via=via)


async def request(
    gateway: Gateway,
    path: str,
    body: Mapping[str, Any] | bytes,
    *,
    session_key: str | None = None,
) -> Answer:
    """Send one inference request through the gateway's routing; the whole answer."""
    proxied = build_request(gateway, path, body, session_key=session_key)
    collector = _Collector()
    try:
        refusal = await gateway.forward(proxied, collector)
    except UpstreamError as error:  # the answer had started, then broke off
        raise UpstreamFailed(502, "upstream_error", str(error)) from None
    if refusal is not None:
        raise error_for(refusal)
    return collector.answer()


@asynccontextmanager
async def stream(
    gateway: Gateway,
    path: str,
    body: Mapping[str, Any] | bytes,
    *,
    session_key: str | None = None,
) -> AsyncIterator[EventStream]:
    """Send a streaming request; yields an ``EventStream`` (see the module docstring)."""
    proxied = build_request(
        gateway, path, body, session_key=session_key, accept=b"text/event-stream"
    )
    pieces_send, pieces_receive = trio.open_memory_channel[bytes](STREAM_BUFFER)
    broken = _Broken()
    try:
        async with trio.open_nursery() as nursery:
            head = await nursery.start(_pump, gateway, proxied, pieces_send, broken)
            if isinstance(head, Refusal):
                raise error_for(head)
            status, headers = head
            worker_id = _header(headers, b"x-worker-id")
            if not 200 <= status < 300:
                rest = b"".join([piece async for piece in pieces_receive])
                raise WorkerAnswered(Answer(status, worker_id, headers, rest))
            events = EventStream(status, worker_id, headers, pieces_receive, broken)
            try:
                yield events
            except BaseException:
                nursery.cancel_scope.cancel()  # an early or failed exit: the upstream goes
                raise
            if events.finished:  # wait (briefly) for the answer's end: its connection is kept
                nursery.cancel_scope.deadline = trio.current_time() + DONE_GRACE_SECS
                async for _ in pieces_receive:
                    pass
            else:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the nursery wraps what the block raised
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        pieces_receive.close()


class EventStream:
    """The answer of ``stream()``: ``status``, ``worker_id``, ``headers``, and an async
    iterator of the SSE ``data:`` values (parsed JSON) until ``[DONE]``."""

    def __init__(
        self,
        status: int,
        worker_id: str | None,
        headers: Headers,
        pieces: trio.MemoryReceiveChannel[bytes],
        broken: _Broken,
    ) -> None:
        self.status = status
        self.worker_id = worker_id
        self.headers = headers
        self.finished = False  # [DONE] seen, or the answer ended
        self._broken = broken
        self._pieces = pieces
        self._buffer = b""
        self._ready: list[Any] = []

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        while not self._ready:
            if self.finished:
                raise StopAsyncIteration
            try:
                piece = await self._pieces.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self.finished = True
                if self._broken.error is not None:
                    message = str(self._broken.error)
                    raise UpstreamFailed(502, "upstream_error", message) from None
                raise StopAsyncIteration from None
            self._parse(piece)
        return self._ready.pop(0)

    def _parse(self, piece: bytes) -> None:
        self._buffer += piece.replace(b"\r\n", b"\n")
        *complete, self._buffer = self._buffer.split(b"\n\n")
        for block in complete:
            data = [
                line[5:].removeprefix(b" ")
                for line in block.split(b"\n")
                if line.startswith(b"data:")
            ]
            if not data:
                continue  # a comment, or an event without data
            text = b"\n".join(data).decode("utf-8", "replace")
            if text == "[DONE]":
                self.finished = True
                return
            try:
                self._ready.append(json.loads(text))
            except ValueError:
                self._ready.append(text)


class _Broken:
    """Where the pump leaves the error of an answer that broke off after its head."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: UpstreamError | None = None


async def _pump(
    gateway: Gateway,
    proxied: ProxyRequest,
    pieces: trio.MemorySendChannel[bytes],
    broken: _Broken,
    *,
    task_status: trio.TaskStatus[Refusal | tuple[int, Headers]],
) -> None:
    """Run ``forward`` and pass the body into ``pieces``; report the head (or the refusal)."""
    async with pieces:  # closed when the answer ends: the consumer sees the end
        try:
            refusal = await gateway.forward(proxied, _ChannelResponder(pieces, task_status))
        except UpstreamError as error:  # after the head: the consumer sees it at the end
            broken.error = error
            return
        if refusal is not None:
            task_status.started(refusal)


class _ChannelResponder:
    __slots__ = ("_pieces", "_status")

    def __init__(
        self,
        pieces: trio.MemorySendChannel[bytes],
        status: trio.TaskStatus[Refusal | tuple[int, Headers]],
    ) -> None:
        self._pieces = pieces
        self._status = status

    async def start(self, status: int, headers: Headers) -> None:
        self._status.started((status, headers))

    async def body(self, data: bytes, *, more: bool) -> None:
        if data:
            await self._pieces.send(data)  # bounded: a consumer that does not read holds us


class _Collector:
    __slots__ = ("_chunks", "_headers", "_status")

    def __init__(self) -> None:
        self._status = 0
        self._headers: Headers = []
        self._chunks: list[bytes] = []

    async def start(self, status: int, headers: Headers) -> None:
        self._status = status
        self._headers = headers

    async def body(self, data: bytes, *, more: bool) -> None:
        if data:
            self._chunks.append(data)

    def answer(self) -> Answer:
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        return Answer(self._status, _header(self._headers, b"x-worker-id"), self._headers, body)


def _header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
