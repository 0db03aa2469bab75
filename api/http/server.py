"""A small HTTP/1.1 server for ASGI apps on trio, built for the gateway's hot path.

Hypercorn's layers cost about 0.5 ms of CPU per request on this machine, more than the whole
proxy (measured: 1,130 proxied requests/s at 32 connections through hypercorn, 3,000 with a raw
trio server). This server keeps what the gateway needs and no more: HTTP/1.1 and 1.0 keep-alive
(pipelined requests answered in order), Content-Length and chunked request bodies, chunked
responses for streams, ``Expect: 100-continue``, and the ASGI ``http`` and ``lifespan`` scopes.

The parts, one concept each:

* this module: listening, accepting, the connection cap and shedding, graceful shutdown;
* ``api/http/limits.py``: every limit (ServerLimits) and the open-file budget;
* ``api/http/connection.py``: one connection (a reader task and a handler task; a client that
  goes away cancels its request);
* ``api/http/parse.py``: request framing on llhttp (httptools) with our stricter rules on top;
* ``api/http/response.py``: response framing (the declared Content-Length is kept exactly).

**Why httptools (llhttp) and not h11.** DESIGN.md asks for h11 unless a faster kept parser
measures materially better. Parsing the benchmark's request (a 100-byte chat completion with
httpx's headers) costs 3.7 us in httptools, 79 us in h11 for the parse alone and 112 us with the
response bookkeeping h11 requires, and 29 us in the old hand parser (best of 3 x 20,000, same
machine, same moment). The proxied request costs the gateway 0.55-0.75 ms of CPU here, so h11
would add 10-20 % per request, outside the 10 % budget the hardening issue allows; httptools
costs less than the hand parser it replaces. (h11 was not run end to end: the per-request
figure already rules it out.)

Failures are contained: an error on one connection ends that connection only, and ``accept``
survives running out of descriptors (it waits and retries).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from api.http.connection import ASGIApp, Connection
from api.http.lifespan import lifespan
from api.http.limits import ServerLimits, connection_cap, raise_open_file_limit
from api.http.response import DateHeader

__all__ = ["ServerLimits", "serve_http1"]

log = logging.getLogger("tmg.http")
LISTEN_BACKLOG = 0xFFFF  # as trio.open_tcp_listeners: the kernel caps it at somaxconn
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def serve_http1(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    limits: ServerLimits | None = None,
    reuse_port: bool = False,
    own_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns (or forever). ``nursery.start`` gets the
    bound URLs, e.g. ``["http://127.0.0.1:41234"]`` for port 0. On shutdown: stop accepting,
    close idle connections, give requests in progress ``graceful_timeout`` to finish.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so several processes listen on one port and the
    kernel spreads new connections over them (``tmg serve --processes``). ``own_port``: also
    listen on a port of this process alone (chosen by the system; its URL comes second), so
    each of those processes can be reached on its own (its ``/metrics``)."""
    limits = limits or ServerLimits()
    server = _Server(app, limits, connection_cap(limits, raise_open_file_limit()))
    async with lifespan(app):
        listeners: list[trio.SocketListener] = []
        try:
            if reuse_port:
                listeners += await _open_reuse_port_listeners(host, port)
            else:
                listeners += await trio.open_tcp_listeners(port, host=host)
            if own_port:
                listeners += await trio.open_tcp_listeners(0, host=host)
            await _serve(server, listeners, shutdown_trigger, task_status, own_port)
        finally:
            for listener in listeners:
                listener.socket.close()  # sync: also when cancelled


async def _open_reuse_port_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with ``SO_REUSEPORT`` set before the bind."""
    found = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _, address in found:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _url(listener: trio.SocketListener) -> str:
    bound = listener.socket.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return f"http://{shown}:{bound[1]}"


async def _serve(
    server: _Server,
    listeners: list[trio.SocketListener],
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]],
    own_port: bool = False,
) -> None:
    urls = [_url(listeners[0])] + ([_url(listeners[-1])] if own_port else [])
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(_accept, listener, connections, server)
            task_status.started(urls)
            if shutdown_trigger is None:
                await trio.sleep_forever()
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            # the kernel completed these handshakes already: closing the listener would reset
            # them unanswered, so each gets its first request served (then a close)
            for stream in _accept_queued(listener):
                server.open += 1
                connections.start_soon(server.run, stream, True)
            listener.socket.close()  # no new connections
        server.stop()
        connections.cancel_scope.deadline = trio.current_time() + server.limits.graceful_timeout


class _Server:
    """What every connection of one server shares: the app, limits, Date, the connection count
    and the idle connections (oldest first), shutdown state."""

    def __init__(self, app: ASGIApp, limits: ServerLimits, cap: int) -> None:
        self.app = app
        self.limits = limits
        self.date = DateHeader()
        self.stopping = False
        self.cap = cap
        self.open = 0
        self._idle: dict[Connection, None] = {}  # insertion order: the oldest idle first
        self._room: trio.Event | None = None  # an accept loop waits for a free slot
        self._shedding: Connection | None = None  # shed to make room, not closed yet

    def idle(self, connection: Connection) -> None:
        self._idle.pop(connection, None)
        self._idle[connection] = None
        self._wake()

    def busy(self, connection: Connection) -> None:
        self._idle.pop(connection, None)

    def stop(self) -> None:
        self.stopping = True
        for connection in list(self._idle):
            connection.stop()

    async def admit(self, listener: trio.SocketListener) -> None:
        """Return when one more connection may be accepted. When full and a client is knocking,
        shed the oldest idle connection; with none idle, the client waits in the backlog."""
        while self.open >= self.cap:
            if self._idle and self._shedding is None:
                await trio.lowlevel.wait_readable(listener.socket)  # someone is knocking
                if self.open < self.cap or not self._idle or self._shedding is not None:
                    continue
                oldest = next(iter(self._idle))
                del self._idle[oldest]
                log.debug("%d connections open: closing the oldest idle one", self.open)
                oldest.shed()
                self._shedding = oldest
            self._room = room = self._room or trio.Event()
            await room.wait()

    async def run(self, stream: trio.SocketStream, last_call: bool = False) -> None:
        connection = Connection(self, stream, last_call=last_call)
        try:
            await connection.run()
        finally:
            self.open -= 1
            self._idle.pop(connection, None)
            if self._shedding is connection:
                self._shedding = None
            self._wake()

    def _wake(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None


def _accept_queued(listener: trio.SocketListener) -> list[trio.SocketStream]:
    """The connections waiting in the listen backlog, taken without waiting (a duplicate of the
    listening socket in non-blocking mode, so trio's own socket is left as it is)."""
    taken: list[trio.SocketStream] = []
    with socket.socket(fileno=os.dup(listener.socket.fileno())) as sock:
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as error:
                log.debug("draining the backlog at shutdown: %s", error)
                return taken
            conn.setblocking(False)
            taken.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))


async def _accept(listener: trio.SocketListener, nursery: trio.Nursery, server: _Server) -> None:
    while True:
        await server.admit(listener)
        try:
            stream = await listener.accept()
        except OSError as error:
            if error.errno not in _ACCEPT_RETRY:
                raise
            log.warning("accept failed (%s); retrying shortly", error)
            await trio.sleep(0.1)
            continue
        server.open += 1
        nursery.start_soon(server.run, stream)
