"""api/http/server.py against hostile and careless clients, over real sockets: resets, refusals that
must be immediate, the declared Content-Length kept exactly, linear buffering, the write timeout,
the connection cap with shedding, and cancellation of a request whose client went away."""

from __future__ import annotations

import logging
import resource
import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing

from api.http.limits import connection_cap, raise_open_file_limit
from api.http.parse import RequestParser
from api.http.server import ServerLimits
from tests.asgi_apps import App, BodyLengths, Receive, Scope, Send, serve
from tests.raw_http import connect, get, read_all, reset_after

CHUNKED = b"Transfer-Encoding: chunked\r\n"


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- item 1: one connection's error ends that connection only ---------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GET /echo HTTP/1.1\r\nHo",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc",
    ],
    ids=["at once", "half a head", "half a body"],
)
async def test_a_client_that_resets_does_not_stop_the_server(
    url: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(5):
        for _ in range(20):
            await reset_after(url, data)
        await trio.testing.wait_all_tasks_blocked()
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get())
            assert (await peer.answer()).status == 200
    assert warnings(caplog) == []


# --- item 4: refusals, at once ----------------------------------------------------------------

REFUSED = {
    "Transfer-Encoding with an LF before its colon, plus Content-Length": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding\n: chunked\r\nContent-Length: 3"
        b"\r\n\r\nabc",
        400,
    ),
    "a method followed by an LF": (b"GET\n /echo HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "a second Host": (b"GET /echo HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n", 400),
    "Transfer-Encoding on HTTP/1.0": (
        b"POST /echo HTTP/1.0\r\n" + CHUNKED + b"\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "a lower-case method": (b"get /echo HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "a chunk size with blanks around it": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\n 3 \r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "gzip then chunked": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "an Upgrade with a body": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: x\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    # These used to wait for the head timeout (30 s): the answer must come without more bytes.
    "an empty request": (b"\r\n\r\n", 400),
    "a bare-LF request": (b"\n", 400),
    "an HTTP/0.9 request": (b"GET /echo\r\n", 400),
    "a bare LF ending the request line": (b"GET /echo HTTP/1.1\n", 400),
}


@pytest.mark.parametrize(("request_bytes", "status"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_request_that_must_be_refused_gets_its_status_at_once_and_a_close(
    url: str, app: App, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(5):  # the head timeout is 30 s: an answer now means no waiting for it
        peer = await connect(url)
        async with peer.stream:
            await peer.send(request_bytes)
            answer = await peer.answer()
            assert answer.status == status
            assert answer.headers[b"connection"] == b"close"
            await peer.closed()
    assert app.paths == []


async def test_one_empty_line_before_a_request_is_still_allowed(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(b"\r\n" + get() + b"\r\n" + get("/second"))
            assert (await peer.answer()).status == 200
            assert (await peer.answer()).json()["path"] == "/second"


async def test_an_upgrade_request_without_a_body_is_served_as_plain_http(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get(extra=b"Connection: upgrade\r\nUpgrade: h2c\r\n") + get("/next"))
            assert (await peer.answer()).status == 200
            assert (await peer.answer()).json()["path"] == "/next"


# --- item 2: never more or fewer body bytes than declared -------------------------------------


def sized_app(declared: int, sent: list[bytes]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"%d" % declared)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for piece in sent[:-1]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": sent[-1]})

    return app


async def test_an_app_sending_more_than_its_content_length_is_cut_and_the_connection_closed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    url = await serve(nursery, sized_app(5, [b"hel", b"lo", b"HTTP/1.1 200 SMUGGLED\r\n\r\n"]))
    with trio.fail_after(5):
        received = await read_all(url, get() + get())  # the second request is never answered
    _, _, body = received.partition(b"\r\n\r\n")
    assert body == b"hello"
    assert received.count(b"HTTP/1.1") == 1
    assert [r.getMessage() for r in warnings(caplog)] == [
        "the app sent more body than its Content-Length; the excess was dropped"
    ]


async def test_an_app_sending_less_than_its_content_length_gets_the_connection_closed(
    nursery: trio.Nursery,
) -> None:
    url = await serve(nursery, sized_app(10, [b"hello"]))
    with trio.fail_after(5):
        received = await read_all(url, get() + get())
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"content-length: 10" in head
    assert body == b"hello"  # then the close: the client knows the answer is short


# --- item 5: linear buffering -----------------------------------------------------------------


async def test_a_32_mib_body_sized_or_in_one_chunk_arrives_whole(nursery: trio.Nursery) -> None:
    app = BodyLengths()
    url = await serve(nursery, app)
    size = 32 * 1024 * 1024
    body = b"x" * size
    sized = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
    chunked = b"POST / HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\n%x\r\n" % size
    with trio.fail_after(30):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(sized + body)
            assert (await peer.answer()).status == 204
            await peer.send(chunked + body + b"\r\n0\r\n\r\n")
            assert (await peer.answer()).status == 204
    assert app.lengths == [size, size]


@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "one chunk"])
async def test_a_body_arriving_in_32768_small_pieces_costs_linear_time(chunked: bool) -> None:
    # 32 MiB in 1 KiB pieces: copying the buffer on each piece (quadratic) would move 512 GiB
    # and never finish within the generous limit; appending costs milliseconds.
    size, piece = 32 * 1024 * 1024, b"y" * 1024
    parser = RequestParser(max_head=65536, max_headers=100, max_body=size)
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % size
        if chunked
        else (b"Content-Length: %d\r\n\r\n" % size)
    )
    parser.receive(b"POST / HTTP/1.1\r\nHost: t\r\n" + framing)
    assert parser.read_head() is not None
    body = None
    with trio.fail_after(60):
        for _ in range(size // len(piece)):
            assert body is None
            parser.receive(piece)
            body = parser.read_body()
            await trio.lowlevel.checkpoint()  # where the time limit can strike
        if chunked:
            parser.receive(b"\r\n0\r\n\r\n")
            body = parser.read_body()
    assert body is not None
    assert len(body) == size


# --- item 6: the write timeout ----------------------------------------------------------------


class NeverEnding:
    def __init__(self) -> None:
        self.cancelled = trio.Event()
        self.completed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(1000):  # 64 MB: far more than the socket buffers hold
                await send({"type": "http.response.body", "body": b"z" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            self.completed = True
        except trio.Cancelled:
            self.cancelled.set()
            raise


async def test_a_client_that_never_reads_is_dropped_after_the_write_timeout_and_cancelled(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app = NeverEnding()
    url = await serve(nursery, app, limits=ServerLimits(write_timeout=30))
    peer = await connect(url)
    async with peer.stream:
        await peer.send(get("/big"))
        start = trio.current_time()
        with trio.fail_after(120):  # virtual time: the clock jumps while everyone waits
            await app.cancelled.wait()
        assert 30 <= trio.current_time() - start < 60
        with trio.fail_after(120):  # what was sent is there to read, then the connection ends
            while await peer.stream.receive_some(1 << 20):
                pass
    assert not app.completed
    assert warnings(caplog) == []


# --- item 7: the connection cap, and shedding the oldest idle connection ----------------------


async def test_a_full_server_sheds_the_oldest_idle_connection_to_answer_a_new_client(
    app: App, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    url = await serve(nursery, app, limits=ServerLimits(max_connections=3))
    with trio.fail_after(5):
        idle = [await connect(url) for _ in range(3)]
        for peer in idle:  # each has had a request: idle keep-alive connections, oldest first
            await peer.send(get())
            assert (await peer.answer()).status == 200
        newcomer = await connect(url)
        async with newcomer.stream:
            await newcomer.send(get("/new"))
            assert (await newcomer.answer()).json()["path"] == "/new"
        await idle[0].closed()  # the oldest was closed to make room
        await idle[1].send(get())  # the others still serve
        assert (await idle[1].answer()).status == 200
        for peer in idle:
            await peer.stream.aclose()
    assert warnings(caplog) == []


async def test_a_full_server_with_no_idle_connection_lets_new_clients_wait_for_a_free_one(
    app: App, nursery: trio.Nursery
) -> None:
    url = await serve(nursery, app, limits=ServerLimits(max_connections=1))
    with trio.fail_after(5):
        busy = await connect(url)
        await busy.send(get("/slow"))
        await app.entered.wait()
        waiting = await connect(url)  # the kernel accepts it; the server does not, yet
        await waiting.send(get("/later"))
        await trio.testing.wait_all_tasks_blocked()
        assert app.paths == ["/slow"]
        app.gate.set()
        assert (await busy.answer()).status == 200
        await busy.stream.aclose()  # the slot frees: the waiting client is served
        assert (await waiting.answer()).json()["path"] == "/later"
        await waiting.stream.aclose()


async def test_a_client_waiting_in_the_backlog_at_shutdown_is_answered_not_reset(
    app: App, nursery: trio.Nursery
) -> None:
    stop = trio.Event()
    url = await serve(
        nursery, app, limits=ServerLimits(max_connections=1), shutdown_trigger=stop.wait
    )
    with trio.fail_after(5):
        busy = await connect(url)
        await busy.send(get("/slow"))
        await app.entered.wait()
        waiting = await connect(url)  # in the kernel's backlog: the server is full
        await waiting.send(get("/later"))
        await trio.testing.wait_all_tasks_blocked()
        stop.set()  # the server stops while the client waits in its backlog
        await trio.testing.wait_all_tasks_blocked()
        app.gate.set()
        assert (await busy.answer()).status == 200
        answer = await waiting.answer()
        assert answer.json()["path"] == "/later"
        assert answer.headers[b"connection"] == b"close"  # served once, then closed
        await busy.stream.aclose()
        await waiting.stream.aclose()


async def test_a_connection_whose_first_request_is_on_its_way_at_shutdown_is_answered(
    app: App, nursery: trio.Nursery
) -> None:
    stop = trio.Event()
    url = await serve(nursery, app, shutdown_trigger=stop.wait)
    with trio.fail_after(5):
        used = await connect(url)
        await used.send(get("/first"))
        assert (await used.answer()).status == 200  # now idle between requests
        fresh = await connect(url)  # accepted; its request is still on its way
        await trio.testing.wait_all_tasks_blocked()
        stop.set()
        await trio.testing.wait_all_tasks_blocked()
        assert await used.stream.receive_some() == b""  # idle between requests: closed
        await fresh.send(get("/second"))
        answer = await fresh.answer()
        assert answer.json()["path"] == "/second"
        assert answer.headers[b"connection"] == b"close"
        await used.stream.aclose()
        await fresh.stream.aclose()


def test_the_open_file_limit_is_raised_to_the_hard_limit_and_the_cap_leaves_room() -> None:
    soft = raise_open_file_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft
    assert connection_cap(ServerLimits(), 1024) == 480  # half of what the reserve leaves
    assert connection_cap(ServerLimits(), 50) == 16
    assert connection_cap(ServerLimits(max_connections=7), 1024) == 7


# --- item 8: a client that goes away cancels its request --------------------------------------


class Waiter:
    """Waits for ever, before answering (/wait) or after one streamed chunk (/stream)."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.cancelled = trio.Event()
        self.extensions: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.extensions = scope["extensions"]
        try:
            await receive()
            if scope["path"] == "/stream":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"one", "more_body": True})
            self.entered.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.set()
            raise


@pytest.mark.parametrize("path", ["/wait", "/stream"])
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_that_goes_away_cancels_its_request(
    nursery: trio.Nursery, path: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = Waiter()
    url = await serve(nursery, app)
    with trio.fail_after(5):
        peer = await connect(url)
        await peer.send(get(path))
        await app.entered.wait()
        if path == "/stream":
            assert b"one" in await peer.stream.receive_some(65536)
        if how == "reset":
            peer.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        peer.stream.socket.close()
        await app.cancelled.wait()
    assert app.extensions["tmg.cancel_on_disconnect"] == {}
    assert warnings(caplog) == []


async def test_receive_after_the_body_still_reports_the_disconnect(
    nursery: trio.Nursery,
) -> None:
    told = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        with trio.CancelScope(shield=True):  # an app that ignores the cancellation still hears
            assert (await receive())["type"] == "http.disconnect"
            told.set()

    url = await serve(nursery, app)
    with trio.fail_after(5):
        peer = await connect(url)
        await peer.send(get())
        await trio.testing.wait_all_tasks_blocked()
        await peer.stream.aclose()
        await told.wait()
