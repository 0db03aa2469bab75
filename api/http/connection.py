"""One HTTP/1.1 connection of api/http/server.py: a reader task that owns every receive, a
handler task that runs the app for one request at a time.

**The reader** receives bytes, feeds the request parser (api/http/parse.py) and hands complete
requests (head and whole body) to the handler in order, at most one waiting ahead of the one being
served (pipelining is served, with bounded memory). It also applies the time limits of the
request side: keep-alive while idle, head time from the first byte, body time after the head, and
answers ``Expect: 100-continue`` when the handler is idle (the only write it makes).

**The handler** runs the app on each request and writes the answer. Every write is bounded by the
write timeout: a client that stops reading is dropped, not held for ever.

**Disconnects cancel the request.** Because the reader is always receiving, it sees the client go
(EOF or reset) while the app runs, and cancels the app's cancel scope: no watcher task per
request. A half-close counts as going away, as in common proxies; a client must keep its sending
side open until it has its answer. The app is told with
``scope["extensions"]["tmg.cancel_on_disconnect"]``; ``receive()`` after the body still returns
``http.disconnect`` when the client goes, as ASGI requires. The cost: one task switch per request
more than a single-task loop (the request is handed from one task to the other).

**Failures stay here.** Any error on one connection (a reset before ``getpeername``, a reset mid
head, a broken pipe) ends that connection only, logged at debug; a bug in the app is logged with
its traceback and answered with 500 when nothing was sent yet.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from api.http.limits import ServerLimits
from api.http.parse import BadRequest, Head, RequestParser
from api.http.response import DateHeader, ResponseFramer, serialize_head

log = logging.getLogger("tmg.http")
RECV = 65536
CANCEL_ON_DISCONNECT = "tmg.cancel_on_disconnect"
Message = dict[str, Any]
ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
_SOCKET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Host(Protocol):
    """What a connection needs from its server (api/http/server.py's _Server)."""

    app: ASGIApp
    limits: ServerLimits
    date: DateHeader
    stopping: bool

    def idle(self, connection: Connection) -> None:
        """The connection waits for a request: it may be shed (oldest first)."""

    def busy(self, connection: Connection) -> None:
        """The connection has a request in progress."""


@dataclass(frozen=True, slots=True)
class _Request:
    head: Head
    body: bytes


_END = None  # in the queue: no more requests on this connection
_Item = _Request | BadRequest | None


class Connection:
    def __init__(self, host: Host, stream: trio.SocketStream, *, last_call: bool = False) -> None:
        # accepted while the server stops: serve the request on its way, then close
        self._last_call = last_call
        self._served = False  # a request was taken off the queue
        self._host = host
        self._stream = stream
        self._limits = limits = host.limits
        self._parser = RequestParser(
            max_head=limits.max_head_bytes,
            max_headers=limits.max_headers,
            max_body=limits.max_body_bytes,
        )
        self._queue: deque[_Item] = deque()
        self._queued: trio.Event | None = None  # the handler waits for the queue
        self._taken: trio.Event | None = None  # the reader waits for the handler to take one
        self._handler_idle: trio.Event | None = None  # the reader waits to send 100 Continue
        self._busy = True  # the handler has a request (until it first waits for one)
        self._idle_scope: trio.CancelScope | None = None  # the reader's wait between requests
        self._app_scope: trio.CancelScope | None = None
        self._gone = False  # the client went away (EOF, reset, or not reading)
        self._gone_event: trio.Event | None = None
        self._client: tuple[str, int] | None = None
        self._server: tuple[str, int] | None = None

    def shed(self) -> None:
        """Close this connection if it is idle (the server is full, or shutting down)."""
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    def stop(self) -> None:
        """The server stops. A connection between requests is closed; one whose first request
        has not arrived yet (its client connected and is sending) serves that request first:
        closing it would drop a request the client has every right to expect an answer to."""
        if self._served:
            self.shed()
        else:
            self._last_call = True

    async def run(self) -> None:
        sock = self._stream.socket
        try:
            self._client = _address(sock.getpeername())
            self._server = _address(sock.getsockname())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                await self._handle_loop()
                nursery.cancel_scope.cancel()
        except* _SOCKET_ERRORS as group:
            log.debug("connection from %s ended: %r", self._client, group.exceptions[0])
        except* Exception:
            log.exception("connection from %s failed", self._client)
        finally:
            sock.close()

    # --- the reader ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    break
                if self._queue:  # one is waiting already: hold this one until it is taken
                    self._taken = taken = trio.Event()
                    await taken.wait()
                self._push(request)
                if not request.head.keep_alive:
                    await self._watch_for_close()
                    return
        except BadRequest as refusal:
            self._push(refusal)
            return
        except _SOCKET_ERRORS as error:
            log.debug("connection from %s: %r", self._client, error)
            self._went_away()
        self._push(_END)

    async def _read_request(self) -> _Request | None:
        """The next complete request; None when the connection ends without one."""
        parser, limits = self._parser, self._limits
        head = None
        while not parser.started:  # between requests: the keep-alive time applies
            data = await self._receive_idle()
            if data is None:
                return None  # idle too long, shed, or shutting down
            if not data:
                if self._busy or self._queue:
                    self._went_away()  # the app is running: cancel it
                return None
            parser.receive(data)
            head = parser.read_head()
        if head is None:
            with trio.move_on_after(limits.head_timeout) as waiting:
                while (head := parser.read_head()) is None:
                    await self._receive_more()
            if waiting.cancelled_caught:
                raise BadRequest(408, "the request head took too long to arrive")
        assert head is not None
        body = parser.read_body()
        if body is None:
            if head.expects_continue:
                await self._wait_for_idle_handler()
                if not await self._send(b"HTTP/1.1 100 Continue\r\n\r\n"):
                    return None
            with trio.move_on_after(limits.body_timeout) as waiting:
                while (body := parser.read_body()) is None:
                    await self._receive_more()
            if waiting.cancelled_caught:
                raise BadRequest(408, "the request body took too long to arrive")
        assert body is not None
        return _Request(head, body)

    async def _receive_idle(self) -> bytes | None:
        """Bytes of the next request; None if the keep-alive time ran out or we were shed."""
        with trio.CancelScope() as scope:
            self._idle_scope = scope
            if not self._busy and not self._queue:
                self._became_idle()
            try:
                data = await self._stream.receive_some(RECV)
            finally:
                self._idle_scope = None
                self._host.busy(self)
        return None if scope.cancelled_caught else data

    async def _receive_more(self) -> None:
        data = await self._stream.receive_some(RECV)
        if not data:
            if self._busy or self._queue:
                self._went_away()
            raise BadRequest(400, "the connection closed in the middle of a request")
        self._parser.receive(data)

    async def _watch_for_close(self) -> None:
        """After the last request: bytes are dropped, EOF or a reset means the client left."""
        try:
            while await self._stream.receive_some(RECV):
                pass
        except _SOCKET_ERRORS:
            pass
        self._went_away()

    async def _wait_for_idle_handler(self) -> None:
        while self._busy or self._queue:
            self._handler_idle = idle = trio.Event()
            await idle.wait()

    def _became_idle(self) -> None:
        scope = self._idle_scope
        if scope is not None:
            scope.deadline = trio.current_time() + self._limits.keep_alive_timeout
            self._host.idle(self)

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        if self._queued is not None:
            self._queued.set()
            self._queued = None

    def _went_away(self) -> None:
        if self._gone:
            return
        self._gone = True
        if self._gone_event is not None:
            self._gone_event.set()
        if self._app_scope is not None:
            self._app_scope.cancel()
        self._push(_END)

    # --- the handler --------------------------------------------------------------------------

    async def _handle_loop(self) -> None:
        while True:
            item = await self._next_item()
            if item is None or self._gone:
                return
            if isinstance(item, BadRequest):
                await self._refuse(item.status, item.message)
                return
            if not await self._serve(item):
                return

    async def _next_item(self) -> _Item:
        if self._host.stopping and not (self._last_call and not self._served):
            return _END
        if not self._queue:
            self._busy = False
            self._became_idle()
            if self._handler_idle is not None:
                self._handler_idle.set()
                self._handler_idle = None
            while not self._queue:
                self._queued = queued = trio.Event()
                await queued.wait()
        item = self._queue.popleft()
        self._served = True
        self._busy = True
        if self._idle_scope is not None:
            self._idle_scope.deadline = math.inf
            self._host.busy(self)
        if self._taken is not None:
            self._taken.set()
            self._taken = None
        return item

    async def _serve(self, request: _Request) -> bool:
        """Run the app on one request; True when the connection may serve another."""
        head = request.head
        framer = ResponseFramer(
            method=head.method,
            version=head.version,
            keep_alive=head.keep_alive and not self._last_call,
            date=self._host.date,
        )
        exchange = _Exchange(self, request.body, framer)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": head.version,
            "method": head.method,
            "scheme": "http",
            "path": head.path,
            "raw_path": head.raw_path,
            "query_string": head.query,
            "root_path": "",
            "headers": head.headers,
            "client": self._client,
            "server": self._server,
            "extensions": {CANCEL_ON_DISCONNECT: {}},
        }
        with trio.CancelScope() as app_scope:
            self._app_scope = app_scope
            if self._gone:
                app_scope.cancel()
            try:
                await self._host.app(scope, exchange.receive, exchange.send)
            except Exception:
                log.exception("unhandled error in the app for %s %s", head.method, head.path)
        self._app_scope = None
        if self._gone:
            return False
        if not framer.started:
            await self._refuse(500, "internal error")
            return False
        return framer.finished and head.keep_alive and not framer.close and not self._last_call

    async def _send(self, data: bytes) -> bool:
        """Write within the write timeout; False (and the client counted gone) if that failed."""
        # a CancelScope rather than move_on_after: the generator-based helper costs more, and
        # this runs on every write
        with trio.CancelScope(deadline=trio.current_time() + self._limits.write_timeout):
            try:
                await self._stream.send_all(data)
            except _SOCKET_ERRORS as error:
                log.debug("connection from %s: write failed: %r", self._client, error)
                self._went_away()
                return False
            return True
        log.info(
            "connection from %s: the client read nothing for %s s; closing it",
            self._client,
            self._limits.write_timeout,
        )
        self._went_away()
        return False

    async def _refuse(self, status: int, message: str) -> None:
        body = message.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        await self._send(serialize_head(status, headers, len(body), self._host.date()) + body)

    async def wait_gone(self) -> None:
        if self._gone:
            await trio.lowlevel.checkpoint()
            return
        if self._gone_event is None:
            self._gone_event = trio.Event()
        await self._gone_event.wait()

    async def write(self, data: bytes) -> None:
        """A piece of the app's answer; if the client is gone, the app is cancelled here."""
        if self._gone or not await self._send(data):
            await trio.lowlevel.checkpoint()  # the app's scope is cancelled: Cancelled is raised
            raise trio.ClosedResourceError("the client went away")  # outside an app scope


class _Exchange:
    """The ASGI receive/send pair of one request."""

    __slots__ = ("_body", "_connection", "_framer")

    def __init__(self, connection: Connection, body: bytes, framer: ResponseFramer) -> None:
        self._connection = connection
        self._body: bytes | None = body
        self._framer = framer

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._connection.wait_gone()  # after the body, only a disconnect is news
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        framer = self._framer
        kind = message["type"]
        if kind == "http.response.start":
            framer.start(int(message["status"]), list(message.get("headers", ())))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        overflow = framer.overflow
        out = framer.body(message.get("body", b""), bool(message.get("more_body", False)))
        if framer.overflow and not overflow:
            log.warning("the app sent more body than its Content-Length; the excess was dropped")
        if out:
            await self._connection.write(out)


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
