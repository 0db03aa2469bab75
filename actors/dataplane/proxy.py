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

Busy is not broken. A worker answering 429 or 503 is overloaded, not failing: its breaker records
no verdict (``CircuitBreakers.busy``), ``tmg_worker_busy_total{worker_id}`` counts it, and the
request, which did not run, is tried on another worker (a retry like any other: it takes one of
the ``retries``). Its body is read (up to ``SMALL_ANSWER``, within ``BUSY_READ_SECS``) so that the
connection stays pooled. When every worker tried was busy, or some were busy and the others
failed or none is left to try, the client gets the busy answer (never a 502): 429 when every busy
answer was a 429, else 503, code ``workers_busy``, with ``Retry-After`` the smallest one the
busy workers gave (the soonest any of them expects to have room; the client's retry is routed
afresh, so any worker will do), or 1 when none gave one. A Retry-After is delay-seconds or an
HTTP-date; anything else is ignored; it is capped at ``MAX_RETRY_AFTER``.

Two failures are not the worker's: the gateway out of file descriptors (ResourcesExhausted: a
503 with Retry-After, no breaker, no retry elsewhere), and a request that came around again
(``x-tmg-via`` names this gateway; refused by the ASGI layer; a worker answering 508 is passed
on to the client as it is, and counts against the worker's breaker).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
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
BUSY = frozenset((429, 503))  # the worker is overloaded, not failing
WORKERS_BUSY = "workers_busy"  # the code of a busy refusal
BUSY_READ_SECS = 1.0  # reading a busy answer's small body (to keep its connection) takes no longer
MAX_RETRY_AFTER = 3600


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
        busy: Refusal | None = None  # the busy answers so far, merged
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
            if last.code == WORKERS_BUSY:
                busy = last if busy is None else _merge_busy(busy, last)
        if busy is not None:
            return _busy_answer(busy, model)
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
                if status in BUSY:  # overloaded, not failing: no verdict, try another
                    self._metrics.count_busy(worker.id)
                    self.breakers.busy(worker.id)
                    verdict = True
                    retry_after = _retry_after(answer.headers)
                    if answer.length is not None and answer.length <= SMALL_ANSWER:
                        # read out, the connection stays pooled; if that fails the pool closes
                        # it, and the answer is busy all the same
                        with trio.move_on_after(BUSY_READ_SECS), suppress(UpstreamError):
                            await answer.read()
                    message = f"the worker answered {status} (busy)"
                    return Refusal(status, WORKERS_BUSY, message, retry_after=retry_after)
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


def _retry_after(headers: Headers) -> int | None:
    """A worker's Retry-After in whole seconds (delay-seconds or an HTTP-date), capped at
    ``MAX_RETRY_AFTER``; None when it gave none, or none that can be read."""
    for name, value in headers:
        if name == b"retry-after":
            value = value.strip()
            if value.isdigit():
                return MAX_RETRY_AFTER if len(value) > 6 else min(int(value), MAX_RETRY_AFTER)
            try:
                when = parsedate_to_datetime(value.decode("latin-1"))
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                return None
            return min(max(0, math.ceil(when.timestamp() - time.time())), MAX_RETRY_AFTER)
    return None


def _merge_busy(first: Refusal, second: Refusal) -> Refusal:
    """Two busy answers as one: 429 only if both were; the smaller Retry-After given."""
    status = first.status if first.status == second.status else 503
    given = [r for r in (first.retry_after, second.retry_after) if r is not None]
    return Refusal(status, WORKERS_BUSY, first.message, retry_after=min(given, default=None))


def _busy_answer(busy: Refusal, model: str) -> Refusal:
    retry_after = 1 if busy.retry_after is None else busy.retry_after
    message = (
        f"every worker tried for model {model!r} is busy ({busy.status}); "
        f"retry after {retry_after} s"
    )
    return Refusal(busy.status, WORKERS_BUSY, message, retry_after=retry_after)
