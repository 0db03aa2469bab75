"""DataPlane: forward one inference request to one worker, and stream the answer back.

The hot path reads only the latest published snapshot and the in-flight counters: pick a worker
with the routing policy and count it in flight in the same synchronous step (so a drain can never
miss a request), then send the request through the keep-alive pool. A connect error, a reset
before the first response byte, or a 5xx before any byte reached the client is retried on
another worker (``retries`` times). Failures feed the circuit breakers.

Answers are passed on by size. One whose Content-Length is at most ``SMALL_ANSWER`` is read
whole and sent in one piece (one write to the client for the common short completion). Anything
larger, or not sized (chunked, to EOF: streams), goes through piece by piece as it arrives, so a
client that reads slowly, or not at all, holds at most the socket buffers, never a whole answer.
The Content-Length sent to the client is always the one the pool framed the body by (h11 hands
out exactly that many bytes or fails), never a header merely copied from the worker; a body that
ends short of it cuts the client's connection (the answer is never finished, so the server
closes it) rather than leaving it expecting bytes that belong to the next answer.

Two failures are not the worker's: the gateway out of file descriptors (ResourcesExhausted: a
503 with Retry-After, no breaker, no retry elsewhere), and a request that came around again
(``x-tmg-via`` names this gateway; refused by the ASGI layer; a worker answering 508 is passed
on to the client as it is, and counts against the worker's breaker).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from actors.core.model import ConnectionMode, Worker, WorkerStatus
from actors.core.snapshot import RegistrySnapshot
from actors.dataplane.breaker import CircuitBreakers
from actors.dataplane.inflight import InFlight
from actors.dataplane.metrics import GatewayMetrics
from actors.dataplane.routing import Router, RouteRequest
from actors.dataplane.upstream.pool import (
    ReadTimedOut,
    ResourcesExhausted,
    UpstreamError,
    UpstreamPool,
)

Headers = list[tuple[bytes, bytes]]
# never copied from a worker's answer: connection-level headers, and Content-Length (set from
# the framing the pool checked, see the module docstring)
NOT_FORWARDED = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"date",
        b"server",
        b"content-length",
    )
)
SMALL_ANSWER = 64 * 1024  # a sized answer up to this is read whole and sent in one piece
LOOP_DETECTED = 508


class Responder(Protocol):
    """Where the answer goes (the ASGI layer). ``start`` is called at most once."""

    async def start(self, status: int, headers: Headers) -> None: ...

    async def body(self, data: bytes, *, more: bool) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyRequest:
    path: bytes  # the target forwarded to the worker, e.g. b"/v1/chat/completions"
    body: bytes  # forwarded unchanged
    route: RouteRequest
    accept: bytes | None = None
    via: bytes | None = None  # the x-tmg-via hop list to send on, this gateway included


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why no worker answered: the OpenAI error the client gets."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    final: bool = False  # the request may have run on the worker: do not retry elsewhere


class DataPlane:
    def __init__(
        self,
        snapshot: Callable[[], RegistrySnapshot],
        inflight: InFlight,
        pool: UpstreamPool,
        router: Router,
        breakers: CircuitBreakers,
        metrics: GatewayMetrics,
        *,
        retries: int = 2,
    ) -> None:
        self._snapshot = snapshot
        self._inflight = inflight
        self._pool = pool
        self.router = router
        self.breakers = breakers
        self._metrics = metrics
        self.retries = retries

    def forget(self, worker_id: str) -> None:
        """A worker left the registry: drop its routing and breaker state, and its metric
        series."""
        self.router.forget(worker_id)
        self.breakers.forget(worker_id)
        self._metrics.forget_worker(worker_id)

    async def forward(self, request: ProxyRequest, respond: Responder) -> Refusal | None:
        """Proxy ``request``; None when an answer went out, else why none could."""
        started = time.perf_counter()
        model = request.route.model
        tried: set[str] = set()
        last: Refusal | None = None
        for attempt in range(self.retries + 1):
            now = trio.current_time()
            candidates = self._candidates(model, tried, now)
            if not candidates:
                break
            worker = self.router.choose(request.route, candidates, self._inflight.count)
            tried.add(worker.id)
            if attempt:
                self._metrics.retries.labels(model).inc()
            self.breakers.routed(worker.id, now)
            self._inflight.acquire(worker.id)  # same step as choose(): a drain sees it
            try:
                last = await self._try(worker, request, respond, started)
            finally:
                self._inflight.release(worker.id)
            if last is None or last.final:
                return last
        return last or self._no_worker(model)

    def _candidates(self, model: str, tried: set[str], now: float) -> Sequence[Worker]:
        snapshot = self._snapshot()
        return [
            worker
            for worker in snapshot.ready_for_model(model)
            if worker.is_healthy
            and worker.id not in tried
            and worker.detection is not None
            and worker.detection.connection_mode is ConnectionMode.HTTP
            and self.breakers.allows(worker.id, now)
        ]

    async def _try(
        self, worker: Worker, request: ProxyRequest, respond: Responder, started: float
    ) -> Refusal | None:
        """One attempt on one worker. A Refusal means nothing reached the client (retry unless
        final); an error after the answer started propagates (the client's answer is cut)."""
        url = worker.url
        model = request.route.model
        headers = self._headers(worker, request)
        verdict = answered = False
        try:
            async with self._pool.request(
                url.host, url.port, b"POST", request.path, headers, request.body, tls=url.is_tls
            ) as answer:
                status = answer.status
                self._metrics.count_request(model, worker.id, status)
                if status >= 500 and status != LOOP_DETECTED:
                    self.breakers.failed(worker.id, trio.current_time())
                    verdict = True
                    return Refusal(502, "upstream_error", f"the worker answered {status}")
                if status == LOOP_DETECTED:  # it is this gateway, or leads back to it
                    self.breakers.failed(worker.id, trio.current_time())
                else:
                    self.breakers.succeeded(worker.id)
                verdict = True
                forwarded = [(k, v) for k, v in answer.headers if k not in NOT_FORWARDED]
                forwarded.append((b"x-worker-id", worker.id.encode()))
                length = answer.length
                if length is not None and status != 204 and status != 304:
                    forwarded.append((b"content-length", b"%d" % length))
                # a small sized answer is read whole (exactly ``length`` bytes: h11 checks) and
                # goes out in one send; anything else piece by piece as it arrives
                small = length is not None and length <= SMALL_ANSWER
                whole = await answer.read() if small else None
                await respond.start(status, forwarded)
                answered = True
                self._metrics.ttfb.labels(model).observe(time.perf_counter() - started)
                if whole is None:
                    async for chunk in answer.chunks():
                        await respond.body(chunk, more=True)
            # the upstream answer is complete and its connection back in the pool before the
            # client's answer ends (ending it lets the ASGI server report a disconnect)
            await respond.body(whole or b"", more=False)
        except ResourcesExhausted as error:  # ours, not the worker's: no breaker, no retry
            return Refusal(503, "gateway_overloaded", str(error), retry_after=1, final=True)
        except UpstreamError as error:
            if not verdict:
                self.breakers.failed(worker.id, trio.current_time())
                verdict = True
            if answered:
                raise
            if error.retryable:
                return Refusal(502, "upstream_unreachable", str(error))
            status = 504 if isinstance(error, ReadTimedOut) else 502
            return Refusal(status, "upstream_error", str(error), final=True)
        finally:
            if not verdict:
                self.breakers.abandoned(worker.id)
        self._metrics.duration.labels(model).observe(time.perf_counter() - started)
        return None

    @staticmethod
    def _headers(worker: Worker, request: ProxyRequest) -> Headers:
        headers: Headers = [(b"content-type", b"application/json")]
        # only the worker's own key: the client's Authorization may be a credential for this
        # gateway (its admin key), so it is never passed on
        if worker.spec.api_key:
            headers.append((b"authorization", b"Bearer " + worker.spec.api_key.encode()))
        if request.accept is not None:
            headers.append((b"accept", request.accept))
        if request.via is not None:
            headers.append((b"x-tmg-via", request.via))
        return headers

    def _no_worker(self, model: str) -> Refusal:
        snapshot = self._snapshot()
        listed = snapshot.select(model=model)
        if any(w.status is WorkerStatus.READY and w.is_healthy for w in listed) and all(
            w.connection_mode is ConnectionMode.GRPC
            for w in listed
            if w.status is WorkerStatus.READY
        ):
            return Refusal(
                501,
                "grpc_not_supported",
                f"model {model!r} is served only by gRPC workers; this gateway proxies HTTP only",
            )
        waiting = any(
            w.status is WorkerStatus.PENDING and w.spec.model_id is None
            for w in snapshot.workers.values()
        )
        if listed or waiting:
            return Refusal(
                503,
                "no_available_workers",
                f"no worker for model {model!r} can take a request now",
                retry_after=1,
            )
        return Refusal(404, "model_not_found", f"no worker serves model {model!r}")
