"""A small HTTP/1.1 server for ASGI apps on trio, built for the gateway's hot path.

Hypercorn's layers cost about 0.5 ms of CPU per request on this machine, more than the whole
proxy (measured: 1,130 proxied requests/s at 32 connections through hypercorn, 3,000 with a raw
trio server). This server keeps what the gateway needs and no more: HTTP/1.1 and 1.0 keep-alive
(requests on a connection answered in order), Content-Length and chunked request bodies, chunked
responses for streams, ``Expect: 100-continue``, and the ASGI ``http`` and ``lifespan`` scopes.
Every limit is explicit: head size, body size, header count, and time to send a head.

Requests are parsed by hand (``api/http1_parse.py``, fuzzed in the tests); a malformed request
gets a 400 and the connection is closed. A head plus the first piece of body go out in one write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from api.asgi_lifespan import lifespan
from api.http1_parse import (
    BadRequest,
    DateHeader,
    Head,
    Reader,
    address,
    content_length,
    serialize_head,
)

log = logging.getLogger("tmg.http")
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
Message = dict[str, Any]
ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = 32 * 1024 * 1024  # the app may refuse less (the management API: 1 MiB)
    head_timeout: float = 30.0  # from the first byte of a request to the end of its head
    body_timeout: float = 120.0  # from the end of the head to the end of the body
    keep_alive_timeout: float = 75.0  # an idle connection is closed after this long
    graceful_timeout: float = 5.0  # requests in progress get this long to finish on shutdown


async def serve_http1(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    limits: ServerLimits | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns (or forever). ``nursery.start`` gets the
    bound URLs, e.g. ``["http://127.0.0.1:41234"]`` for port 0. On shutdown: stop accepting,
    close idle connections, give requests in progress ``graceful_timeout`` to finish."""
    server = _Server(app, limits or ServerLimits())
    async with lifespan(app):
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            await _serve(server, listeners, shutdown_trigger, task_status)
        finally:
            for listener in listeners:
                listener.socket.close()  # sync: also when cancelled


async def _serve(
    server: _Server,
    listeners: list[trio.SocketListener],
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    bound = listeners[0].socket.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(_accept, listener, connections, server)
            task_status.started([f"http://{shown}:{bound[1]}"])
            if shutdown_trigger is None:
                await trio.sleep_forever()
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            listener.socket.close()  # no new connections
        server.stop()
        connections.cancel_scope.deadline = trio.current_time() + server.limits.graceful_timeout


class _Server:
    """What every connection of one server shares: the app, limits, Date, shutdown state."""

    def __init__(self, app: ASGIApp, limits: ServerLimits) -> None:
        self.app = app
        self.limits = limits
        self.date = DateHeader()
        self.stopping = False
        self.idle: set[trio.CancelScope] = set()  # connections waiting for their next request

    def stop(self) -> None:
        self.stopping = True
        for scope in self.idle:
            scope.cancel()


async def _accept(listener: trio.SocketListener, nursery: trio.Nursery, server: _Server) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as error:
            if error.errno not in _ACCEPT_RETRY:
                raise
            log.warning("accept failed (%s); retrying shortly", error)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(_Connection(server, stream).run)


class _Connection:
    def __init__(self, server: _Server, stream: trio.abc.Stream) -> None:
        self._server_state = server
        self._app = server.app
        self._date = server.date
        self._stream = stream
        self._limits = limits = server.limits
        self._reader = Reader(stream, limits.max_head_bytes, limits.max_headers)
        sock = getattr(stream, "socket", None)
        self._client = address(sock.getpeername()) if sock is not None else None
        self._server = address(sock.getsockname()) if sock is not None else None

    async def run(self) -> None:
        async with self._stream:
            try:
                while await self._one_request():
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away

    async def _one_request(self) -> bool:
        """Serve one request; False when the connection must close."""
        limits, server = self._limits, self._server_state
        if server.stopping:
            return False
        arrived = False
        with trio.move_on_after(limits.keep_alive_timeout) as idle:
            server.idle.add(idle)
            try:
                arrived = await self._reader.wait_for_data()
            finally:
                server.idle.discard(idle)
        if not arrived or idle.cancelled_caught:
            return False  # closed, idle too long, or shutting down: the normal end
        try:
            with trio.fail_after(limits.head_timeout):
                head = await self._reader.read_head()
            with trio.fail_after(limits.body_timeout):
                body = await self._read_body(head)
        except trio.TooSlowError:
            await self._refuse(408, "the request took too long to arrive")
            return False
        except BadRequest as error:
            await self._refuse(error.status, error.message)
            return False
        exchange = _Exchange(self._stream, head, body, self._reader, self._date)
        scope = {
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
            "extensions": {},
        }
        try:
            await self._app(scope, exchange.receive, exchange.send)
        except Exception:
            log.exception("unhandled error in the app for %s %s", head.method, head.path)
        if not exchange.started:
            await self._refuse(500, "internal error")
            return False
        return exchange.finished and head.keep_alive and not exchange.close

    async def _read_body(self, head: Head) -> bytes:
        limit = self._limits.max_body_bytes
        if head.content_length is not None and head.content_length > limit:
            raise BadRequest(413, f"the body is over {limit} bytes")  # before any 100 Continue
        if (
            head.expects_continue
            and head.version == "1.1"
            and (head.content_length or head.chunked)
        ):
            await self._stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await self._reader.read_body(head, self._limits.max_body_bytes)

    async def _refuse(self, status: int, message: str) -> None:
        body = message.encode()
        head = serialize_head(
            status,
            [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")],
            len(body),
            self._date(),
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_all(head + body)


class _Exchange:
    """The ASGI receive/send pair of one request."""

    def __init__(
        self, stream: trio.abc.Stream, head: Head, body: bytes, reader: Reader, date: DateHeader
    ) -> None:
        self._date = date
        self._bodiless = False
        self._stream = stream
        self._head = head
        self._body: bytes | None = body
        self._reader = reader
        self._pending: bytes | None = None  # the response head, sent with the first body piece
        self._chunked = False
        self.started = self.finished = self.close = self.gone = False

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._reader.wait_for_eof()  # after the body, only a disconnect is news
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            status = int(message["status"])
            headers = list(message.get("headers", ()))
            length = content_length(headers)
            bodiless = self._head.method == "HEAD" or status in (204, 304) or status < 200
            self._chunked = length is None and not bodiless
            if self._chunked:
                if self._head.version == "1.0":  # no chunked framing in 1.0: delimit by close
                    self._chunked = False
                    self.close = True
                else:
                    headers.append((b"transfer-encoding", b"chunked"))
            if any(n.lower() == b"connection" and v.lower() == b"close" for n, v in headers):
                self.close = True  # the app asked for it
            elif not self._head.keep_alive or self.close:
                headers.append((b"connection", b"close"))
            self._pending = serialize_head(status, headers, None, self._date())
            self._bodiless = bodiless
        elif kind == "http.response.body":
            if not self.started or self.finished:
                raise RuntimeError("http.response.body outside a response")
            data: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            out = self._pending or b""
            self._pending = None
            if not self._bodiless:
                if self._chunked:
                    if data:
                        out += b"%x\r\n%b\r\n" % (len(data), data)
                    if not more:
                        out += b"0\r\n\r\n"
                else:
                    out += data
            if out and not self.gone:
                try:
                    await self._stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.gone = self.close = True  # the client left: later sends do nothing
            if not more:
                self.finished = True
