"""The upstream client against scripted servers on real sockets (ports chosen by the OS).

Each server is a small handler written in the test.  A handler learns that the client closed a
connection by reading EOF (``Peer.request()`` returns None), which is how these tests prove
that a connection was closed and not pooled.  Timeout tests run on the autojump clock against
servers that never answer.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.dataplane.upstream.connection import (
    BadResponse,
    BodyTooLarge,
    ConnectFailed,
    NoResponse,
    ReadTimedOut,
    ResourcesExhausted,
    UpstreamError,
)
from actors.dataplane.upstream.pool import UpstreamLimits, UpstreamPool
from tests.raw_http import HOST, Handler, Peer, RawServer

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


async def serve(nursery: trio.Nursery, handler: Handler) -> RawServer:
    return await RawServer(handler).start(nursery)


def answer_each(response: bytes, closed: trio.Event | None = None) -> Handler:
    """A keep-alive handler: ``response`` to every request; sets ``closed`` at client EOF."""

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(response)
        if closed is not None:
            closed.set()

    return handler


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    async with UpstreamPool() as pool:
        yield pool


async def get(pool: UpstreamPool, port: int, target: bytes = b"/") -> tuple[int, bytes]:
    async with pool.request(HOST, port, b"GET", target, [], b"") as response:
        return response.status, await response.read()


# ---- bodies --------------------------------------------------------------------------------


async def test_a_content_length_body_is_read_and_the_request_is_sent_as_one_message(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    seen: list[bytes] = []
    response = b"HTTP/1.1 201 Created\r\nX-Thing: A\r\nContent-Length: 5\r\n\r\nhello"

    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            seen.append(request)
            await peer.send(response)

    server = await serve(nursery, handler)
    headers = [(b"Content-Type", b"application/json"), (b"x-request-id", b"r1")]
    with trio.fail_after(5):
        async with pool.request(HOST, server.port, b"POST", b"/v1/x?a=1", headers, b"{}") as r:
            assert r.status == 201
            assert r.headers == [(b"x-thing", b"A"), (b"content-length", b"5")]
            assert await r.read() == b"hello"
            assert await r.read() == b""
    assert seen == [
        b"POST /v1/x?a=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-length: 2\r\n"
        b"Content-Type: application/json\r\nx-request-id: r1\r\n\r\n{}" % server.port
    ]
    assert pool.idle_count(HOST, server.port) == 1


async def test_a_chunked_body_is_read_whole(nursery: trio.Nursery, pool: UpstreamPool) -> None:
    body = b"5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\ntrailer: x\r\n\r\n"
    server = await serve(nursery, answer_each(CHUNKED_HEAD + body))
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"hello, world")
    assert pool.idle_count(HOST, server.port) == 1


async def test_a_close_delimited_body_is_read_to_eof_and_not_pooled(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nuntil the ")
        await peer.send(b"end")

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"until the end")
    assert pool.idle_count(HOST, server.port) == 0


async def test_a_head_response_has_no_body_and_keeps_the_connection(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    server = await serve(nursery, answer_each(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"))
    with trio.fail_after(5):
        for _ in range(2):
            async with pool.request(HOST, server.port, b"HEAD", b"/", [], b"") as response:
                assert await response.read() == b""
    assert server.accepted == 1


async def test_chunks_arrive_before_the_response_ends(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    first_seen = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
        await first_seen.wait()
        await peer.send(b"6\r\nsecond\r\n0\r\n\r\n")
        await peer.request()

    server = await serve(nursery, handler)
    received: list[bytes] = []
    with trio.fail_after(5):
        async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as response:
            async for chunk in response.chunks():
                received.append(chunk)
                first_seen.set()
    assert received == [b"first", b"second"]
    assert pool.idle_count(HOST, server.port) == 1


async def test_pieces_already_buffered_come_as_one_chunk(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    body = b"".join(b"2\r\n%d\n\r\n" % i for i in range(5)) + b"0\r\n\r\n"
    server = await serve(nursery, answer_each(CHUNKED_HEAD + body))
    with trio.fail_after(5):
        async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as response:
            assert [chunk async for chunk in response.chunks()] == [b"0\n1\n2\n3\n4\n"]


async def test_informational_responses_are_skipped(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    server = await serve(nursery, answer_each(early + OK))
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"ok")


# ---- keep-alive and closing ----------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    server = await serve(nursery, answer_each(OK))
    with trio.fail_after(5):
        for _ in range(10):
            assert await get(pool, server.port) == (200, b"ok")
    assert server.accepted == 1
    assert pool.idle_count(HOST, server.port) == 1


async def test_a_body_not_fully_read_closes_the_connection(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    closed = trio.Event()
    server = await serve(nursery, answer_each(OK, closed))
    with trio.fail_after(5):
        async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as response:
            assert response.status == 200
        await closed.wait()
    assert pool.idle_count(HOST, server.port) == 0


async def test_an_exception_in_the_block_closes_the_connection(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    closed = trio.Event()
    server = await serve(nursery, answer_each(OK, closed))
    with trio.fail_after(5):
        with pytest.raises(KeyError):
            async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as response:
                await response.read()
                raise KeyError("boom")
        await closed.wait()
    assert pool.idle_count(HOST, server.port) == 0


async def test_cancellation_mid_body_propagates_and_closes_the_connection(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    closed = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
        assert await peer.request() is None
        closed.set()

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as response:
                async for chunk in response.chunks():
                    assert chunk == b"first"
                    scope.cancel()
        assert scope.cancelled_caught
        await closed.wait()
    assert pool.idle_count(HOST, server.port) == 0


async def test_cancellation_while_waiting_for_the_head_closes_the_connection(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    got_request, closed = trio.Event(), trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        got_request.set()
        assert await peer.request() is None
        closed.set()

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:

            async def cancel_once_sent() -> None:
                await got_request.wait()
                inner.cancel_scope.cancel()

            inner.start_soon(cancel_once_sent)
            await get(pool, server.port)
        await closed.wait()


@pytest.mark.parametrize(
    "response", [OK[:17] + b"connection: close\r\n" + OK[17:], OK.replace(b"1.1", b"1.0")]
)
async def test_a_response_refusing_keep_alive_is_not_pooled(
    nursery: trio.Nursery, pool: UpstreamPool, response: bytes
) -> None:
    server = await serve(nursery, answer_each(response))
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"ok")
        assert await get(pool, server.port) == (200, b"ok")
    assert server.accepted == 2
    assert pool.idle_count(HOST, server.port) == 0


async def test_a_request_with_connection_close_is_not_pooled(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    closed = trio.Event()
    server = await serve(nursery, answer_each(OK, closed))
    with trio.fail_after(5):
        headers = [(b"Connection", b"Close")]
        async with pool.request(HOST, server.port, b"GET", b"/", headers, b"") as response:
            assert await response.read() == b"ok"
        await closed.wait()


async def test_bytes_after_the_response_keep_the_connection_out_of_the_pool(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    closed = trio.Event()
    server = await serve(nursery, answer_each(OK + OK, closed))
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"ok")
        await closed.wait()


async def test_the_idle_stack_is_bounded_and_aclose_closes_it(nursery: trio.Nursery) -> None:
    all_arrived = trio.Event()
    waiting = 0
    closed: list[trio.Event] = []

    async def handler(peer: Peer) -> None:
        nonlocal waiting
        closed.append(event := trio.Event())
        await peer.request()
        waiting += 1
        if waiting == 4:
            all_arrived.set()
        await all_arrived.wait()  # so that the four requests hold four connections
        await peer.send(OK)
        assert await peer.request() is None
        event.set()

    server = await serve(nursery, handler)
    pool = UpstreamPool(UpstreamLimits(max_idle_per_host=2))
    with trio.fail_after(5):
        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(get, pool, server.port)
        assert server.accepted == 4
        assert pool.idle_count(HOST, server.port) == 2
        assert sum(event.is_set() for event in closed) <= 2
        await pool.aclose()
        for event in closed:
            await event.wait()
    assert pool.idle_count(HOST, server.port) == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.request(HOST, server.port, b"GET", b"/", [], b"")


async def test_a_connection_idle_too_long_is_closed_not_reused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    closed = trio.Event()
    server = await serve(nursery, answer_each(OK, closed))
    async with UpstreamPool(UpstreamLimits(idle_timeout=30)) as pool:
        with trio.fail_after(100):
            await get(pool, server.port)
            await trio.sleep(31)  # virtual time
            await get(pool, server.port)
            await closed.wait()
        assert server.accepted == 2
        assert pool.idle_count(HOST, server.port) == 1


# ---- stale connections and failures before a response --------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_stale_pooled_connection_is_retried_transparently(
    nursery: trio.Nursery, pool: UpstreamPool, how: str
) -> None:
    first_closed = trio.Event()

    async def handler(peer: Peer) -> None:
        if first_closed.is_set():
            return await answer_each(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")(peer)
        await peer.request()
        await peer.send(OK)
        await (peer.reset() if how == "rst" else peer.stream.aclose())
        first_closed.set()

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"ok")
        assert pool.idle_count(HOST, server.port) == 1
        await first_closed.wait()
        assert await get(pool, server.port) == (200, b"fresh")
    assert server.accepted == 2
    assert pool.idle_count(HOST, server.port) == 1


async def test_the_stale_retry_happens_once_then_no_response(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if server.accepted == 1:
            await peer.send(OK)

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        assert await get(pool, server.port) == (200, b"ok")
        with pytest.raises(NoResponse):
            await get(pool, server.port)
    assert server.accepted == 2  # the first, then one fresh connection for the retry


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_fresh_connection_closed_before_responding_is_no_response(
    nursery: trio.Nursery, pool: UpstreamPool, how: str
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if how == "rst":
            await peer.reset()

    server = await serve(nursery, handler)
    with trio.fail_after(5), pytest.raises(NoResponse) as caught:
        await get(pool, server.port)
    assert caught.value.retryable
    assert f"127.0.0.1:{server.port}" in str(caught.value)
    assert server.accepted == 1


async def test_a_refused_connection_is_connect_failed(pool: UpstreamPool) -> None:
    probe = trio.socket.socket()
    await probe.bind((HOST, 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with trio.fail_after(5), pytest.raises(ConnectFailed) as caught:
        await get(pool, port)
    assert caught.value.retryable
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "connection refused" in str(caught.value)


async def test_a_stale_connection_also_drops_the_connections_idle_longer(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    both_arrived = trio.Event()

    async def handler(peer: Peer) -> None:
        if server.accepted > 2:
            return await answer_each(OK)(peer)
        await peer.request()
        if server.accepted == 2:
            both_arrived.set()
        await both_arrived.wait()  # two connections at once, so two go idle
        await peer.send(OK)  # then the worker restarts: both are closed

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        async with trio.open_nursery() as clients:
            clients.start_soon(get, pool, server.port)
            clients.start_soon(get, pool, server.port)
        assert pool.idle_count(HOST, server.port) == 2
        assert await get(pool, server.port) == (200, b"ok")
    assert server.accepted == 3
    assert pool.idle_count(HOST, server.port) == 1  # the older stale one is gone too


async def test_a_connect_that_hangs_is_connect_failed_after_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = trio.socket.socket()
    await listener.bind((HOST, 0))
    listener.listen(0)  # never accepted: once its queue is full, SYNs go unanswered
    port = listener.getsockname()[1]
    fillers = []
    hung = False
    while not hung:
        fillers.append(filler := trio.socket.socket())
        with trio.move_on_after(1) as scope:
            await filler.connect((HOST, port))
        hung = scope.cancelled_caught
    try:
        async with UpstreamPool(UpstreamLimits(connect_timeout=5)) as pool:
            with trio.fail_after(100), pytest.raises(ConnectFailed, match="timed out") as caught:
                await get(pool, port)
        assert caught.value.retryable
    finally:
        for sock in [*fillers, listener]:
            sock.close()


# A self-signed certificate for IP 127.0.0.1, valid 2000-2100, and its key (test-only).
CERT = b"""-----BEGIN CERTIFICATE-----
MIIBXDCCAQKgAwIBAgIBATAKBggqhkjOPQQDAjAUMRIwEAYDVQQDDAkxMjcuMC4w
LjEwIBcNMDAwMTAxMDAwMDAwWhgPMjEwMDAxMDEwMDAwMDBaMBQxEjAQBgNVBAMM
CTEyNy4wLjAuMTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABF4DOgT4L4Vk1de2
c8eTtm3Q0iHrqZJ7B+9NcdQvn3APb5+4vz2+2f8UZdsrCR4Ajm7Rp97Uh4jC9f3G
sfov3najQzBBMA8GA1UdEwEB/wQFMAMBAf8wDwYDVR0RBAgwBocEfwAAATAdBgNV
HQ4EFgQUfgteq6xSPWp3FqnOXLcOESngI9swCgYIKoZIzj0EAwIDSAAwRQIhAPSj
xHT3uESffNT8U/ElwbnPeEmKMMu+p5+D5ldEnZwpAiBs6gZ3jD3m22jzAYVKUbX9
OiayffP/Gm63oHYrmp2OYw==
-----END CERTIFICATE-----
"""
KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgScYzFPvEeaGvfROu
UGO1CLUU8fgU5xWEbT3EZFH93ymhRANCAAReAzoE+C+FZNXXtnPHk7Zt0NIh66mS
ewfvTXHUL59wD2+fuL89vtn/FGXbKwkeAI5u0afe1IeIwvX9xrH6L952
-----END PRIVATE KEY-----
"""


@pytest.fixture
def server_tls(tmp_path: Path) -> ssl.SSLContext:
    (tmp_path / "cert.pem").write_bytes(CERT)
    (tmp_path / "key.pem").write_bytes(KEY)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


async def test_tls_requests_keep_alive_and_an_untrusted_certificate_is_connect_failed(
    nursery: trio.Nursery, server_tls: ssl.SSLContext
) -> None:
    async def handler(peer: Peer) -> None:
        peer.stream = trio.SSLStream(
            peer.stream, server_tls, server_side=True, https_compatible=True
        )
        await answer_each(CHUNKED_HEAD + b"3\r\ntls\r\n0\r\n\r\n")(peer)

    server = await serve(nursery, handler)
    trusted = ssl.create_default_context(cadata=CERT.decode("ascii"))
    with trio.fail_after(5):
        async with UpstreamPool(ssl_context=trusted) as pool:
            for _ in range(3):
                async with pool.request(HOST, server.port, b"GET", b"/", [], b"", tls=True) as r:
                    assert await r.read() == b"tls"
            assert pool.idle_count(HOST, server.port) == 1
        async with UpstreamPool() as pool:  # the system's CAs do not know this certificate
            with pytest.raises(ConnectFailed, match="TLS handshake") as caught:
                await get_tls(pool, server.port)
        assert caught.value.retryable
    assert server.accepted == 2


async def get_tls(pool: UpstreamPool, port: int) -> None:
    async with pool.request(HOST, port, b"GET", b"/", [], b"", tls=True):
        pass


# ---- bad responses, limits and timeouts ----------------------------------------------------


async def test_a_head_over_max_head_bytes_is_bad_response(nursery: trio.Nursery) -> None:
    big = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000 + b"\r\ncontent-length: 2\r\n\r\nok"
    server = await serve(nursery, answer_each(big))
    async with UpstreamPool(UpstreamLimits(max_head_bytes=1024)) as pool:
        with trio.fail_after(5), pytest.raises(BadResponse) as caught:
            await get(pool, server.port)
        assert not caught.value.retryable
        assert "1024" in str(caught.value)
        assert pool.idle_count(HOST, server.port) == 0


async def test_an_endless_head_is_bad_response(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        while True:
            await peer.send(b"x-more: " + b"a" * 1000 + b"\r\n")

    server = await serve(nursery, handler)
    async with UpstreamPool(UpstreamLimits(max_head_bytes=4096)) as pool:
        with trio.fail_after(5), pytest.raises(BadResponse):
            await get(pool, server.port)


async def test_read_over_max_body_bytes_is_body_too_large_but_chunks_are_not_capped(
    nursery: trio.Nursery,
) -> None:
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"b" * 100
    closed = trio.Event()
    server = await serve(nursery, answer_each(response, closed))
    async with UpstreamPool(UpstreamLimits(max_body_bytes=99)) as pool:
        with trio.fail_after(5):
            async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as r:
                assert len(b"".join([chunk async for chunk in r.chunks()])) == 100
            with pytest.raises(BodyTooLarge):
                async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as r:
                    await r.read()
            await closed.wait()
        assert pool.idle_count(HOST, server.port) == 0


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        CHUNKED_HEAD + b"zz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    ],
)
async def test_malformed_responses_are_bad_response(
    nursery: trio.Nursery, pool: UpstreamPool, response: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(response)

    server = await serve(nursery, handler)
    with trio.fail_after(5), pytest.raises(BadResponse) as caught:
        await get(pool, server.port)
    assert not caught.value.retryable
    assert pool.idle_count(HOST, server.port) == 0


async def test_a_body_framed_both_by_length_and_by_chunks_is_refused_and_its_connection_closed(
    nursery: trio.Nursery, pool: UpstreamPool
) -> None:
    closed = trio.Event()
    forged = b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\nSMUGGLED-RESPONSE"
    body = b"hello" + forged
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )
    server = await serve(nursery, answer_each(response, closed))
    with trio.fail_after(5):
        with pytest.raises(BadResponse, match="both Content-Length and Transfer-Encoding"):
            await get(pool, server.port)
        await closed.wait()
    assert pool.idle_count(HOST, server.port) == 0


@pytest.mark.parametrize(
    ("method", "response", "length"),
    [
        (b"GET", OK, 2),
        (b"GET", CHUNKED_HEAD + b"2\r\nok\r\n0\r\n\r\n", None),
        (b"GET", b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nto the end", None),
        (b"GET", b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n", 0),
        (b"HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", 0),
    ],
)
async def test_length_is_the_size_the_head_fixes_for_the_body(
    nursery: trio.Nursery, pool: UpstreamPool, method: bytes, response: bytes, length: int | None
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(response)
        await peer.stream.aclose()

    server = await serve(nursery, handler)
    with trio.fail_after(5):
        async with pool.request(HOST, server.port, method, b"/", [], b"") as answer:
            body = await answer.read()
    assert answer.length == length
    assert length is None or len(body) == length


@pytest.mark.parametrize("grouped", [False, True])
async def test_a_connect_failing_for_want_of_file_descriptors_is_resources_exhausted(
    pool: UpstreamPool, monkeypatch: pytest.MonkeyPatch, grouped: bool
) -> None:
    async def out_of_descriptors(host: str, port: int, **_: object) -> trio.SocketStream:
        error = OSError(errno.EMFILE, "Too many open files")
        if not grouped:
            raise error
        raise OSError("all attempts failed") from ExceptionGroup("all attempts failed", [error])

    monkeypatch.setattr(trio, "open_tcp_stream", out_of_descriptors)
    with pytest.raises(ResourcesExhausted, match="Too many open files") as caught:
        await get(pool, 9)
    assert not caught.value.retryable
    assert not isinstance(caught.value, ConnectFailed)


async def never_answer(peer: Peer) -> None:
    await peer.request()
    await trio.sleep_forever()


async def test_no_head_within_read_timeout_is_read_timed_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await serve(nursery, never_answer)
    limits = UpstreamLimits(read_timeout=300, connect_timeout=1e6)
    async with UpstreamPool(limits) as pool:
        with trio.fail_after(1000), pytest.raises(ReadTimedOut, match="response head") as caught:
            await get(pool, server.port)
    assert not caught.value.retryable
    assert trio.current_time() >= 300


async def test_a_stalled_body_is_read_timed_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
        await trio.sleep_forever()

    server = await serve(nursery, handler)
    limits = UpstreamLimits(read_timeout=10, connect_timeout=1e6)
    async with UpstreamPool(limits) as pool:
        with trio.fail_after(1000):
            async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as response:
                with pytest.raises(ReadTimedOut, match="body"):
                    await response.read()
                with pytest.raises(BadResponse, match="closed"):
                    await response.read()
        assert pool.idle_count(HOST, server.port) == 0


# ---- the request as sent -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "header"),
    [
        (b"GET", b"/", (b"bad name", b"v")),
        (b"GET", b"/", (b"x:y", b"v")),
        (b"GET", b"/", (b"", b"v")),
        (b"GET", b"/", (b"x", b"a\r\nb")),
        (b"GET", b"/", (b"x", b"a\nb")),
        (b"GET", b"/", (b"x", b"a\rb")),
        (b"GET", b"/", (b"x", b"a\x00b")),
        (b"GET", b"/", (b"Content-Length", b"5")),
        (b"GET", b"/", (b"transfer-encoding", b"chunked")),
        (b"GET", b"/", (b"Host", b"elsewhere")),
        (b"G T", b"/", (b"x", b"v")),
        (b"GET", b"/a b", (b"x", b"v")),
        (b"GET", b"/\r\n", (b"x", b"v")),
    ],
)
async def test_an_invalid_request_is_value_error_and_nothing_is_sent(
    nursery: trio.Nursery,
    pool: UpstreamPool,
    method: bytes,
    target: bytes,
    header: tuple[bytes, bytes],
) -> None:
    server = await serve(nursery, answer_each(OK))
    with pytest.raises(ValueError):
        async with pool.request(HOST, server.port, method, target, [header], b""):
            pass
    assert server.accepted == 0


# ---- fuzz ----------------------------------------------------------------------------------

VALID = [
    OK,
    CHUNKED_HEAD + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nclose-delimited body",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx-a: b\r\n\r\n",
    b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
]
GARBAGE_HEADERS = [
    b"no colon\r\n",
    b" folded: continuation\r\n",
    b"bad name: x\r\n",
    b"x: a\x00b\r\n",
    b": empty name\r\n",
    b"content-length: 7\r\n",
    b"content-length: -1\r\n",
    b"content-length: 1, 2\r\n",
    b"transfer-encoding: gzip\r\n",
    b"transfer-encoding: chunked\r\n",
]
STATUS_LINES = [b"HTTP/1.1 2000 OK", b"HTTX/1.1 200 OK", b"HTTP/1.1 abc", b"HTTP/9 200 OK", b""]
CHUNK_SIZES = [b"zz", b"-1", b"f" * 20, b"5 ;x", b"", b"0x5", b"6"]


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid response mutated."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=200))
    payload = draw(st.sampled_from(VALID))
    head_end = payload.index(b"\r\n")
    mutation = draw(st.sampled_from(["truncate", "insert", "replace", "header", "status", "size"]))
    at = draw(st.integers(0, len(payload)))
    if mutation == "truncate":
        return payload[:at]
    if mutation == "insert":
        return payload[:at] + draw(st.binary(min_size=1, max_size=20)) + payload[at:]
    if mutation == "replace":
        end = draw(st.integers(at, len(payload)))
        return payload[:at] + draw(st.binary(max_size=20)) + payload[end:]
    if mutation == "header":
        line = draw(
            st.sampled_from(GARBAGE_HEADERS) | st.binary(max_size=20).map(b"%s\r\n".__mod__)
        )
        return payload[: head_end + 2] + line + payload[head_end + 2 :]
    if mutation == "status":
        return draw(st.sampled_from(STATUS_LINES)) + payload[head_end:]
    size = draw(st.sampled_from(CHUNK_SIZES))
    return payload.replace(b"\r\n5\r\n", b"\r\n%s\r\n" % size, 1)


@settings(max_examples=200, deadline=None)
@given(payload=responses(), stream=st.booleans())
async def test_fuzz_the_client_fails_only_with_upstream_errors_and_leaks_nothing(
    payload: bytes, stream: bool
) -> None:
    closed: list[trio.Event] = []

    async def handler(peer: Peer) -> None:
        closed.append(event := trio.Event())
        try:
            if await peer.request() is not None:
                await peer.send(payload)
                await peer.tcp.send_eof()
                while await peer.request() is not None:
                    pass  # only the client closing the connection ends this
        except trio.BrokenResourceError:
            pass
        finally:
            event.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await serve(nursery, handler)
            async with UpstreamPool() as pool:
                try:
                    async with pool.request(HOST, server.port, b"GET", b"/", [], b"") as r:
                        if stream:
                            async for _ in r.chunks():
                                pass
                        else:
                            await r.read()
                except UpstreamError:
                    pass
                assert pool.idle_count(HOST, server.port) <= 1
            for event in closed:  # every connection the server saw was closed by the client
                await event.wait()
            assert server.accepted == len(closed) == 1
            nursery.cancel_scope.cancel()
