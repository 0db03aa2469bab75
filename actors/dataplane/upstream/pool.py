"""The data-plane upstream client: HTTP/1.1 keep-alive over trio streams, responses parsed by h11.

    async with pool.request("10.0.0.7", 8000, b"POST", b"/v1/chat/completions",
                            [(b"content-type", b"application/json")], body) as response:
        response.status, response.headers
        await response.read()                      # or: async for chunk in response.chunks()

Per (host, port, tls) the pool keeps a LIFO stack of idle connections.  A connection goes back
on the stack only when the ``async with`` block ends cleanly after the body was read to its end
and both sides agreed on keep-alive; otherwise (body not fully read, any exception, a
cancellation, ``connection: close``) its socket is closed synchronously on the spot.  A pooled
connection that fails before any response byte (the worker closed it while it sat idle) is
replaced by a fresh one once, transparently; see DESIGN.md section 4 for why this client exists.

Errors say whose fault it was. A response head that frames its body two ways (Content-Length
and Transfer-Encoding) is BadResponse, and its connection is closed. A connect that fails because
this process is out of file descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM) is ResourcesExhausted,
not ConnectFailed: the worker is not at fault, and another worker would fare no better.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import cast

import h11
import trio

from actors.dataplane.upstream.connection import (
    RECEIVE_SIZE,
    BadResponse,
    BodyTooLarge,
    Conn,
    ConnectFailed,
    NoResponse,
    ReadTimedOut,
    ResourcesExhausted,
    UpstreamError,
    UpstreamLimits,
    UpstreamResponse,
    connect_error,
    h11_primer,
    host_header,
    serialize_request,
)

__all__ = [
    "BadResponse",
    "BodyTooLarge",
    "ConnectFailed",
    "NoResponse",
    "ReadTimedOut",
    "ResourcesExhausted",
    "UpstreamError",
    "UpstreamLimits",
    "UpstreamPool",
    "UpstreamResponse",
]

_DEFAULT_LIMITS = UpstreamLimits()
_EOM = h11.EndOfMessage()
_NEED_DATA = h11.NEED_DATA
_DONE = h11.DONE
_NOTHING_PENDING = (b"", False)


class _Stale(Exception):
    """Internal: the connection failed before any response byte (the caller decides: retry on
    a fresh connection, or NoResponse)."""


class _Host:
    __slots__ = ("header", "host", "idle", "name", "port", "tls")

    def __init__(self, host: str, port: int, tls: bool) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.header = host_header(host, port)
        self.name = self.header.decode("ascii")
        self.idle: deque[Conn] = deque()

    def take(self, now: float, idle_timeout: float) -> Conn | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if now - conn.idle_since <= idle_timeout:
                return conn
            conn.close()  # the newest is too old, so all below it are too
        return None

    def put(self, conn: Conn, now: float, limits: UpstreamLimits) -> None:
        idle = self.idle
        while idle and now - idle[0].idle_since > limits.idle_timeout:
            idle.popleft().close()
        if len(idle) >= limits.max_idle_per_host:
            if not idle:
                conn.close()
                return
            idle.popleft().close()
        conn.idle_since = now
        idle.append(conn)

    def drop_idle_since(self, since: float) -> None:
        """Close the connections idle at least since ``since`` (one of that age proved stale)."""
        idle = self.idle
        while idle and idle[0].idle_since <= since:
            idle.popleft().close()


class _Exchange(AbstractAsyncContextManager[UpstreamResponse]):
    __slots__ = ("_data", "_head_request", "_host", "_pool", "_primer", "_response")

    def __init__(self, pool: UpstreamPool, host: _Host, data: bytes, primer: h11.Request) -> None:
        self._pool = pool
        self._host = host
        self._data = data
        self._primer = primer
        self._head_request = primer.method == b"HEAD"
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        pool, host = self._pool, self._host
        limits = pool.limits
        conn = host.take(trio.current_time(), limits.idle_timeout)
        if conn is not None:
            try:
                return await self._exchange(conn, limits)
            except _Stale:
                host.drop_idle_since(conn.idle_since)
        conn = await pool._connect(host)
        try:
            return await self._exchange(conn, limits)
        except _Stale as exc:
            raise NoResponse(f"{host.name} {exc}") from exc.__cause__

    async def _exchange(self, conn: Conn, limits: UpstreamLimits) -> UpstreamResponse:
        h = conn.h11
        try:
            h.send_with_data_passthrough(self._primer)
            h.send_with_data_passthrough(_EOM)
            with trio.CancelScope(deadline=trio.current_time() + limits.read_timeout):
                try:
                    await conn.stream.send_all(self._data)
                except trio.BrokenResourceError as exc:
                    raise _Stale("closed the connection before the request was sent") from exc
                received = 0  # bytes, 1xx heads included
                while True:
                    event = h.next_event()
                    if event is _NEED_DATA:
                        try:
                            data = cast(bytes, await conn.stream.receive_some(RECEIVE_SIZE))
                        except trio.BrokenResourceError as exc:
                            if not received:
                                raise _Stale("reset the connection without responding") from exc
                            raise BadResponse(f"{self._host.name} reset the connection") from exc
                        if not data and not received:
                            raise _Stale("closed the connection without responding")
                        received += len(data)
                        h.receive_data(data)
                    elif type(event) is h11.Response:
                        # h11 bounds only an incomplete head; one that arrived whole is sized here
                        if received > limits.max_head_bytes and (
                            received - len(h.trailing_data[0]) > limits.max_head_bytes
                        ):
                            raise BadResponse(
                                f"the response head from {self._host.name} exceeds "
                                f"{limits.max_head_bytes} bytes"
                            )
                        self._response = UpstreamResponse(
                            conn, event, limits, self._host.name, bodiless=self._head_request
                        )
                        return self._response
                    elif type(event) is not h11.InformationalResponse:
                        raise BadResponse(f"unexpected {event!r} from {self._host.name}")
            raise ReadTimedOut(
                f"no response head from {self._host.name} within {limits.read_timeout:g}s"
            )
        except h11.ProtocolError as exc:
            conn.close()
            raise BadResponse(f"bad response head from {self._host.name}: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response = self._response
        if response is None or (conn := response._conn) is None:
            return
        response._conn = None
        h = conn.h11
        if (
            exc_type is None
            and response._done
            and h.our_state is _DONE
            and h.their_state is _DONE
            and h.trailing_data == _NOTHING_PENDING  # no extra bytes, no EOF
            and not self._pool._closed
        ):
            h.start_next_cycle()
            self._host.put(conn, trio.current_time(), self._pool.limits)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to workers; see the module docstring."""

    def __init__(
        self, limits: UpstreamLimits = _DEFAULT_LIMITS, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.limits = limits
        self._ssl_context = ssl_context
        self._hosts: dict[tuple[str, int, bool], _Host] = {}
        self._closed = False

    def request(
        self,
        host: str,
        port: int,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        tls: bool = False,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """One exchange; ValueError (nothing sent) for an invalid method, target or header."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        entry = self._hosts.get((host, port, tls))
        if entry is None:
            entry = self._hosts[(host, port, tls)] = _Host(host, port, tls)
        data, keep_alive = serialize_request(method, target, entry.header, headers, body)
        return _Exchange(self, entry, data, h11_primer(method, keep_alive))

    def idle_count(self, host: str, port: int) -> int:
        hosts = self._hosts
        return sum(len(h.idle) for tls in (False, True) if (h := hosts.get((host, port, tls))))

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        for entry in self._hosts.values():
            while entry.idle:
                entry.idle.pop().close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _connect(self, host: _Host) -> Conn:
        limits = self.limits
        with trio.move_on_after(limits.connect_timeout):
            try:
                stream = await trio.open_tcp_stream(host.host, host.port)
            except OSError as exc:
                raise connect_error(host.name, exc) from exc
            if not host.tls:
                return Conn(stream, stream.socket, limits.max_head_bytes)
            try:
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context()
                tls = trio.SSLStream(
                    stream, self._ssl_context, server_hostname=host.host, https_compatible=True
                )
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                stream.socket.close()
                reason = exc.__cause__ or exc
                raise ConnectFailed(f"TLS handshake with {host.name} failed: {reason}") from exc
            except BaseException:
                stream.socket.close()
                raise
            return Conn(tls, stream.socket, limits.max_head_bytes)
        raise ConnectFailed(
            f"connecting to {host.name} timed out after {limits.connect_timeout:g}s"
        )
