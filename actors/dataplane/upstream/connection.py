"""One upstream connection's bytes: limits, errors, the request as sent, the response as read.

The request is serialised by hand into one buffer (h11's writer costs more than the whole
serialisation); only the response is parsed, by h11.  ``h11_primer`` is the cached
``h11.Request`` fed to a connection's h11 state machine so that it expects the response to the
right method; its bytes are never sent.  The pool that owns connections is
``actors.dataplane.upstream.pool``.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import h11
import trio

RECEIVE_SIZE = 65536  # per receive_some; a whole small response arrives in one
_NEED_DATA = h11.NEED_DATA


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamLimits:
    connect_timeout: float = 5.0
    read_timeout: float = 300.0  # max wait for the response head, and between body chunks
    max_head_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 * 1024  # for read(); streaming iteration is not capped
    max_idle_per_host: int = 64
    idle_timeout: float = 30.0  # a pooled connection idle longer than this is closed, not reused


class UpstreamError(Exception):
    """A request to a worker failed.  ``retryable`` is True when the worker cannot have produced
    a response, so the request may safely go to another worker."""

    retryable: ClassVar[bool] = False


class ConnectFailed(UpstreamError):
    """Refused, unreachable, TLS handshake failed, or the connect timed out."""

    retryable = True


class NoResponse(UpstreamError):
    """The connection was closed or reset before any byte of a response arrived."""

    retryable = True


class BadResponse(UpstreamError):
    """Malformed status line, headers or framing; head too big; cut off mid-response."""


class ReadTimedOut(UpstreamError):
    """The response head, or the next piece of the body, did not arrive in time."""


class BodyTooLarge(UpstreamError):
    """``read()`` found more than ``max_body_bytes`` of body."""


class ResourcesExhausted(UpstreamError):
    """The gateway itself ran out of file descriptors or socket memory while connecting.

    Not the worker's failure: a caller must not count it against the worker (no circuit breaker)
    nor try another worker (the next connect would fail the same way); nothing was sent.
    """


# errnos of a connect or socket() that say this process or host is out of something, whatever
# the worker: descriptors (EMFILE per process, ENFILE per host), socket buffers, kernel memory
LOCAL_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
# Framing and protocol switching belong to this client; the caller cannot set them.
_OWN_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"upgrade"})
_CLOSE_TOKEN = re.compile(rb"(?:^|,)[ \t]*close[ \t]*(?:,|$)", re.IGNORECASE)


def host_header(host: str, port: int) -> bytes:
    """``host:port`` as it goes in the Host header (IPv6 literals in brackets)."""
    if ":" in host:
        name = (host if host.startswith("[") else f"[{host}]").encode("ascii")
    else:
        name = host.encode("idna")
    return b"%s:%d" % (name, port)


def serialize_request(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> tuple[bytes, bool]:
    """The whole request as one buffer, and whether the caller allows keep-alive.

    Raises ValueError, before anything is sent, for a method or header name that is not a
    token, a target or header value with CR, LF or NUL (the target also with spaces), and for
    the headers this client sets itself (Host, Content-Length, Transfer-Encoding, Upgrade).
    """
    if not method or method.translate(None, _TOKEN_CHARS):
        raise ValueError(f"invalid request method {method!r}")
    if not target or _BAD_TARGET.search(target) is not None:
        raise ValueError(f"invalid request target {target!r}")
    parts = [
        method,
        b" ",
        target,
        b" HTTP/1.1\r\nhost: ",
        host,
        b"\r\ncontent-length: ",
        b"%d" % len(body),
        b"\r\n",
    ]
    keep_alive = True
    for name, value in headers:
        if not name or name.translate(None, _TOKEN_CHARS):
            raise ValueError(f"invalid header name {name!r}")
        if _BAD_VALUE.search(value) is not None:
            raise ValueError(f"invalid value for header {name!r}: {value!r}")
        lower = name.lower()
        if lower in _OWN_HEADERS:
            raise ValueError(f"header {name!r} is set by the upstream client, not the caller")
        if lower == b"connection" and _CLOSE_TOKEN.search(value) is not None:
            keep_alive = False
        parts += (name, b": ", value, b"\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts), keep_alive


_primers: dict[tuple[bytes, bool], h11.Request] = {}


def h11_primer(method: bytes, keep_alive: bool) -> h11.Request:
    """The h11 event that stands for a request with this method (cached; never serialised)."""
    primer = _primers.get((method, keep_alive))
    if primer is None:
        headers = [(b"host", b"upstream")]
        if not keep_alive:
            headers.append((b"connection", b"close"))
        primer = h11.Request(method=method, target=b"/", headers=headers)
        if len(_primers) < 64:  # methods are few; never let odd ones grow the cache
            _primers[(method, keep_alive)] = primer
    return primer


def connect_error(name: str, exc: OSError) -> UpstreamError:
    """The error for a failed connect: ResourcesExhausted when any attempt failed for want of
    a local resource (trio.open_tcp_stream reports each address's failure in ``__cause__``),
    else ConnectFailed, saying "connection refused" when that was the errno."""
    errnos = {exc.errno}
    group = exc.__cause__
    if isinstance(group, ExceptionGroup):  # trio.open_tcp_stream tried one or more addresses
        errnos.update(getattr(e, "errno", None) for e in group.exceptions)
    local = [code for code in errnos if code in LOCAL_EXHAUSTION]
    if local:
        reason = os.strerror(local[0])
        return ResourcesExhausted(f"the gateway cannot open a connection to {name}: {reason}")
    if errno.ECONNREFUSED in errnos:
        return ConnectFailed(f"cannot connect to {name}: connection refused")
    return ConnectFailed(f"cannot connect to {name}: {exc}")


class Conn:
    __slots__ = ("h11", "idle_since", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType, head: int) -> None:
        self.stream = stream
        self.socket = socket
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=head)
        self.idle_since = 0.0

    def close(self) -> None:
        self.socket.close()  # synchronous: nothing can stop it, not even a cancellation


class UpstreamResponse:
    """The head of a response (``status``, ``headers`` with lower-cased names), and its body
    through ``read()`` or ``chunks()``, valid inside the ``async with`` block.

    ``length`` is the body's exact size when the head fixes it: the Content-Length that frames
    it, or 0 for a response without a body (to HEAD, 204, 304). It is None for a chunked body
    or one that runs to EOF. h11 holds a sized body to its length: it never hands out a byte
    beyond it, and an EOF before it is an error (BadResponse), so a caller may declare
    ``length`` to its own client before reading. A head with both Content-Length and
    Transfer-Encoding is refused (BadResponse): h11 would frame it by the chunks, and the
    Content-Length, were anyone to pass it on, would let the worker end the answer where it
    likes and forge what follows (request smuggling, turned around).
    """

    __slots__ = ("_conn", "_done", "_limits", "_name", "headers", "length", "status")

    def __init__(
        self,
        conn: Conn,
        event: h11.Response,
        limits: UpstreamLimits,
        name: str,
        *,
        bodiless: bool = False,
    ) -> None:
        status = self.status = event.status_code
        headers: list[tuple[bytes, bytes]] = list(event.headers)
        length: int | None = None
        chunked = False
        for header, value in headers:  # h11 lower-cased the names and merged equal lengths
            if header == b"content-length":
                length = int(value)
            elif header == b"transfer-encoding":
                chunked = True
        if chunked and length is not None:
            raise BadResponse(
                f"{name} answered with both Content-Length and Transfer-Encoding (ambiguous)"
            )
        if bodiless or status in (204, 304):
            length = 0
        self.headers = headers
        self.length = length
        self._conn: Conn | None = conn
        self._done = False
        self._limits = limits
        self._name = name

    async def read(self) -> bytes:
        """The rest of the body; BodyTooLarge beyond ``max_body_bytes``."""
        limit = self._limits.max_body_bytes
        parts: list[bytes] = []
        size = 0
        while (piece := await self._next_piece()) is not None:
            size += len(piece)
            if size > limit:
                self._fail()
                raise BodyTooLarge(f"the response body from {self._name} exceeds {limit} bytes")
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunks(self) -> AsyncIterator[bytes]:
        """Body data as it arrives; what is already buffered comes joined as one chunk."""
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        piece = await self._next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def _next_piece(self) -> bytes | None:
        if self._done:
            return None
        conn = self._conn
        if conn is None:
            raise BadResponse(f"the connection to {self._name} was already closed")
        h = conn.h11
        first: bytes | None = None
        more: list[bytes] | None = None
        try:
            while True:
                event = h.next_event()
                if type(event) is h11.Data:
                    if first is None:
                        first = event.data
                    elif more is None:
                        more = [first, event.data]
                    else:
                        more.append(event.data)
                elif event is _NEED_DATA:
                    if first is not None:
                        break
                    h.receive_data(await self._receive(conn))
                elif type(event) is h11.EndOfMessage:
                    self._done = True
                    if first is None:
                        return None
                    break
                else:
                    raise BadResponse(f"unexpected {event!r} in the body from {self._name}")
        except h11.ProtocolError as exc:
            self._fail()
            raise BadResponse(f"bad response body from {self._name}: {exc}") from exc
        except BaseException:
            self._fail()
            raise
        if more is not None:
            return b"".join(more)
        return bytes(first)  # h11 hands out bytearrays

    async def _receive(self, conn: Conn) -> bytes:
        with trio.CancelScope(deadline=trio.current_time() + self._limits.read_timeout):
            try:
                # typed bytes | bytearray; h11 takes either
                return cast(bytes, await conn.stream.receive_some(RECEIVE_SIZE))
            except trio.BrokenResourceError as exc:
                raise BadResponse(f"{self._name} reset the connection mid-response") from exc
        raise ReadTimedOut(f"{self._name} sent no body data for {self._limits.read_timeout:g}s")

    def _fail(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
