"""Raw HTTP/1 over real sockets, for tests that must control or see every byte.

The client side (``RawClient``, ``connect``, ``get``, ``post``, ...) sends bytes as written and
parses answers with h11. The server side (``RawServer``, ``Peer``) is a scripted worker or
upstream: each connection is handed to a handler that reads requests and writes whatever bytes
the test wants, misbehaving on purpose; it learns that the client closed a connection by reading
EOF (``Peer.request()`` returns None).
"""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Self

import h11
import trio

HOST = "127.0.0.1"

# ---- the client side -------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    informational: list[int]

    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


class RawClient:
    """One raw client connection; answers are parsed with h11, requests are sent as bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def event(self, method: str = "GET") -> Any:
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is h11.IDLE:  # tell h11 what was asked (it frames a HEAD answer by it)
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
            conn.send(h11.EndOfMessage())
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await self.stream.receive_some(65536))
        return event

    async def answer(self, method: str = "GET") -> Answer:
        informational: list[int] = []
        response: h11.Response | None = None
        body = b""
        while True:
            event = await self.event(method)
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return Answer(response.status_code, dict(response.headers), body, informational)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def closed(self) -> None:
        """Assert the server closes the connection with nothing more to say."""
        rest = self.h11.trailing_data[0]
        while data := await self.stream.receive_some(65536):
            rest += data
        assert rest == b""


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def connect(url: str) -> RawClient:
    return RawClient(await trio.open_tcp_stream(HOST, port_of(url)))


def get(path: str = "/echo", *, extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: t\r\n%b\r\n" % (path.encode(), extra)


def post(body: bytes, path: str = "/echo") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (
        path.encode(),
        len(body),
        body,
    )


async def reset_after(url: str, data: bytes) -> None:
    """Connect, send ``data``, then close with a TCP reset (SO_LINGER 0)."""
    sock = trio.socket.socket()
    await sock.connect((HOST, port_of(url)))
    if data:
        await sock.send(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def read_all(url: str, request: bytes) -> bytes:
    """Send ``request`` on a new connection; everything the server sends until it closes."""
    async with await trio.open_tcp_stream(HOST, port_of(url)) as stream:
        await stream.send_all(request)
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    return received


# ---- the server side -------------------------------------------------------------------------

Handler = Callable[["Peer"], Awaitable[None]]


class Peer:
    """The server's side of one connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.tcp = stream
        self.stream: trio.abc.Stream = stream  # replaced by an SSLStream in a TLS test
        self.buffer = b""

    async def request(self) -> bytes | None:
        """The next request (head and body), or None once the client closed the connection."""
        try:
            while b"\r\n\r\n" not in self.buffer:
                data = await self.stream.receive_some()
                if not data:
                    return None
                self.buffer += data
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            length = int(match.group(1)) if match else 0
            while len(rest) < length:
                rest += await self.stream.receive_some()
        except trio.BrokenResourceError:
            return None
        self.buffer = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        linger = struct.pack("ii", 1, 0)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await self.stream.aclose()

    async def wait_closed(self) -> None:
        """Return once the client closed (or reset) the connection."""
        try:
            while await self.stream.receive_some():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # reset by the client, or closed by the handler itself


class RawServer:
    """A server on port 0 that counts connections and hands each one to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> Self:
        listeners = await nursery.start(partial(trio.serve_tcp, self._accept, 0, host=HOST))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _accept(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        await self.handle(Peer(stream))

    async def handle(self, peer: Peer) -> None:
        """One connection; a subclass may wrap the handler."""
        await self.handler(peer)
