"""api/http/server.py over real sockets: framing, keep-alive, limits, refusals, shutdown, fuzz.

The client side is raw bytes (so the tests control every byte) parsed back with h11.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import open_gateway
from api.http.server import ServerLimits
from api.serve import serve_api
from tests.asgi_apps import CHUNKS, App, Receive, Scope, Send, serve
from tests.raw_http import connect, get, port_of, post

HOST = b"Host: t\r\n"
ALLOWED = {100, 200, 400, 413, 431, 501, 505}  # what the fuzz may get back


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- the basics ------------------------------------------------------------------------------


async def test_a_get_is_echoed_with_its_method_path_query_and_headers(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(b"GET /echo?a=1&b=2 HTTP/1.1\r\nHost: t\r\nX-Thing:  spaced \r\n\r\n")
            answer = await peer.answer()
    assert answer.status == 200
    assert answer.headers[b"content-type"] == b"application/json"
    assert b"date" in answer.headers
    echoed = answer.json()
    assert echoed["method"] == "GET"
    assert echoed["path"] == "/echo"
    assert echoed["query_string"] == "a=1&b=2"
    assert echoed["http_version"] == "1.1"
    assert echoed["client"] == "127.0.0.1"
    assert ["x-thing", "spaced"] in echoed["headers"]  # names lower-cased, value trimmed
    assert echoed["body"] == ""


async def test_a_post_with_content_length_delivers_its_body(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(post(b"hello\r\n\r\nworld"))
            answer = await peer.answer()
    assert answer.status == 200
    assert answer.json()["method"] == "POST"
    assert answer.json()["body"] == "hello\r\n\r\nworld"


async def test_three_requests_one_at_a_time_share_one_connection(url: str, app: App) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            for i in range(3):
                await peer.send(post(b"n%d" % i, path=f"/echo/{i}"))
                answer = await peer.answer()
                assert answer.status == 200
                assert answer.json()["body"] == f"n{i}"
    assert app.paths == ["/echo/0", "/echo/1", "/echo/2"]


async def test_pipelined_requests_in_one_write_are_answered_in_order(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get("/echo/a") + post(b"bee", path="/echo/b") + get("/echo/c"))
            answers = [await peer.answer() for _ in range(3)]
    assert [a.json()["path"] for a in answers] == ["/echo/a", "/echo/b", "/echo/c"]
    assert answers[1].json()["body"] == "bee"


async def test_connection_close_closes_after_the_answer(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get(extra=b"Connection: close\r\n"))
            answer = await peer.answer()
            assert answer.status == 200
            assert answer.headers[b"connection"] == b"close"
            await peer.closed()


async def test_http_1_0_closes_after_the_answer_unless_keep_alive_is_asked(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(b"GET /echo HTTP/1.0\r\n\r\n")
            answer = await peer.answer()
            assert answer.status == 200
            assert answer.json()["http_version"] == "1.0"
            await peer.closed()
        peer = await connect(url)
        async with peer.stream:
            for _ in range(2):
                await peer.send(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                assert (await peer.answer()).status == 200
            await peer.send(b"GET /echo HTTP/1.0\r\n\r\n")
            assert (await peer.answer()).status == 200
            await peer.closed()


async def test_a_chunked_body_with_extensions_and_trailers_is_decoded(url: str) -> None:
    body = b"5;name=value\r\nhello\r\nA;x\r\n, world!!!\r\n0;last\r\nX-Trailer: yes\r\n\r\n"
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(head + body + get("/after"))  # the trailers must be consumed
            first = await peer.answer()
            second = await peer.answer()
    assert first.json()["body"] == "hello, world!!!"
    assert second.json()["path"] == "/after"


async def test_expect_100_continue_gets_100_before_the_body_is_sent(url: str) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(head)
            event = await peer.event()
            assert isinstance(event, h11.InformationalResponse)
            assert event.status_code == 100
            await peer.send(b"hello")
            answer = await peer.answer()
    assert answer.status == 200
    assert answer.json()["body"] == "hello"


async def test_a_streamed_answer_is_chunked_and_arrives_in_pieces(url: str, app: App) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get("/stream"))
            received = b""
            while b"\r\n\r\n3\r\none\r\n" not in received:
                received += await peer.stream.receive_some(65536)
            assert b"0\r\n\r\n" not in received  # the rest is still to come
            app.gate.set()
            while not received.endswith(b"0\r\n\r\n"):
                received += await peer.stream.receive_some(65536)
            peer.h11.receive_data(received)
            answer = await peer.answer()
            assert answer.status == 200
            assert answer.headers[b"transfer-encoding"] == b"chunked"
            assert b"content-length" not in answer.headers
            assert answer.body == b"".join(CHUNKS)
            await peer.send(get())  # still usable
            assert (await peer.answer()).status == 200


async def test_a_streamed_answer_to_http_1_0_is_delimited_by_close(url: str, app: App) -> None:
    app.gate.set()
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            received = b""
            while data := await peer.stream.receive_some(65536):
                received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"".join(CHUNKS)


async def test_head_gets_the_headers_but_no_body(url: str, app: App) -> None:
    app.gate.set()
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await peer.answer("HEAD")
            assert answer.status == 200
            assert int(answer.headers[b"content-length"]) > 0
            assert answer.body == b""
            await peer.send(b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await peer.answer("HEAD")
            assert b"transfer-encoding" not in answer.headers
            await peer.send(get())  # a stray body would break this answer's framing
            assert (await peer.answer()).json()["path"] == "/echo"


async def test_a_204_has_no_body_and_the_connection_stays_usable(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get("/204") + get())
            answer = await peer.answer()
            assert answer.status == 204
            assert answer.body == b""
            assert b"transfer-encoding" not in answer.headers
            assert (await peer.answer()).status == 200


async def test_the_scope_has_the_decoded_path_and_the_raw_path_and_query(url: str) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get("/a%20b/%2Fc/caf%C3%A9?x=%20y&z=%2F"))
            echoed = (await peer.answer()).json()
    assert echoed["path"] == "/a b//c/café"
    assert echoed["raw_path"] == "/a%20b/%2Fc/caf%C3%A9"
    assert echoed["query_string"] == "x=%20y&z=%2F"


# --- refusals: ambiguity and malformed requests ---------------------------------------------

CHUNKED = b"Transfer-Encoding: chunked\r\n"
REFUSED = {
    "both Content-Length and Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n" + CHUNKED + b"\r\n0\r\n\r\n",
        400,
    ),
    "two different Content-Lengths": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    "a non-numeric Content-Length": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5x\r\n\r\nhello",
        400,
    ),
    "a negative Content-Length": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400),
    "a Transfer-Encoding other than chunked": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    "chunked then gzip": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        501,
    ),
    "an obs-fold header line": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    "a header name with a space": (b"GET / HTTP/1.1\r\nHost: t\r\nX A: 1\r\n\r\n", 400),
    "a space before the colon": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello",
        400,
    ),
    "a missing Host on HTTP/1.1": (b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    "a control character in a header value": (
        b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n",
        400,
    ),
    "a NUL in a header value": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n", 400),
    "a bare CR in a header value": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n", 400),
    "a bare LF in a header line": (b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", 400),
    "an absolute-form target": (b"GET http://t/ HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "an asterisk target": (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "a method that is not a token": (b"G(T / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "two spaces in the request line": (b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "an HTTP/2.0 request line": (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    "an HTTP/0.9 request line": (b"GET /\r\n\r\n", 400),
    "an HTTP/0.9 version": (b"GET / HTTP/0.9\r\n\r\n", 505),
    "a chunk size that is not hexadecimal": (
        b"POST / HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "a 0x-prefixed chunk size": (
        b"POST / HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "a chunk longer than its size": (
        b"POST / HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\n3\r\nhello\r\n0\r\n\r\n",
        400,
    ),
}


@pytest.mark.parametrize(("request_bytes", "status"), REFUSED.values(), ids=REFUSED.keys())
async def test_an_ambiguous_or_malformed_request_is_refused_and_the_connection_closed(
    url: str, app: App, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(request_bytes + get("/smuggled"))
            answer = await peer.answer()
            assert answer.status == status
            assert answer.headers[b"connection"] == b"close"
            await peer.closed()
    assert app.paths == []  # neither the refused request nor the one behind it reached the app


FUNKY_CHUNKS = {
    "a bare LF in a chunk extension": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "a bare LF in a trailer line": b"5\r\nhello\r\n0\r\nX-T: a\nb\r\n\r\n",
}


@pytest.mark.parametrize("body", FUNKY_CHUNKS.values(), ids=FUNKY_CHUNKS.keys())
async def test_a_bare_lf_inside_chunked_framing_is_refused(url: str, body: bytes) -> None:
    # A proxy that ends lines at a bare LF reads different chunk boundaries ("funky chunks").
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\n"
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(head + body)
            assert (await peer.answer()).status == 400


# --- limits ---------------------------------------------------------------------------------


async def test_a_head_over_max_head_bytes_gets_431(app: App, nursery: trio.Nursery) -> None:
    url = await serve(nursery, app, limits=ServerLimits(max_head_bytes=1024))
    with trio.fail_after(5):
        for size in (1000, 5000):  # ends past the limit; still unfinished at the limit
            peer = await connect(url)
            async with peer.stream:
                await peer.send(get(extra=b"X-Big: %b\r\n" % (b"a" * size)))
                assert (await peer.answer()).status == 431
                await peer.closed()
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get(extra=b"X-Big: %b\r\n" % (b"a" * 800)))
            assert (await peer.answer()).status == 200


async def test_too_many_headers_get_431(app: App, nursery: trio.Nursery) -> None:
    url = await serve(nursery, app, limits=ServerLimits(max_headers=5))
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(4))))
            assert (await peer.answer()).status == 200  # Host + 4 = 5
            await peer.send(get(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(5))))
            assert (await peer.answer()).status == 431
            await peer.closed()


async def test_a_body_over_max_body_bytes_gets_413(app: App, nursery: trio.Nursery) -> None:
    url = await serve(nursery, app, limits=ServerLimits(max_body_bytes=10))
    chunked = b"POST /echo HTTP/1.1\r\nHost: t\r\n" + CHUNKED + b"\r\n"
    with trio.fail_after(5):
        for request in (
            post(b"a" * 11),
            chunked + b"6\r\naaaaaa\r\n5\r\naaaaa\r\n0\r\n\r\n",
        ):
            peer = await connect(url)
            async with peer.stream:
                await peer.send(request)
                assert (await peer.answer()).status == 413
                await peer.closed()
        peer = await connect(url)
        async with peer.stream:
            await peer.send(post(b"a" * 10) + chunked + b"5\r\naaaaa\r\n5\r\naaaaa\r\n0\r\n\r\n")
            assert (await peer.answer()).status == 200
            assert (await peer.answer()).status == 200


async def test_a_head_sent_too_slowly_gets_408(app: App, nursery: trio.Nursery) -> None:
    url = await serve(nursery, app, limits=ServerLimits(head_timeout=0.1))
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(b"GET /echo HTTP/1.1\r\nHo")
            assert (await peer.answer()).status == 408
            await peer.closed()
    assert app.paths == []


async def test_a_body_sent_too_slowly_gets_408(app: App, nursery: trio.Nursery) -> None:
    url = await serve(nursery, app, limits=ServerLimits(body_timeout=0.1))
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
            await peer.send(head + b"abc")  # 3 of the 10 promised bytes, then nothing
            assert (await peer.answer()).status == 408
            await peer.closed()
    assert app.paths == []


async def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_timeout(
    app: App, nursery: trio.Nursery
) -> None:
    url = await serve(nursery, app, limits=ServerLimits(keep_alive_timeout=0.1))
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get())
            assert (await peer.answer()).status == 200
            await peer.closed()  # no request within 0.1 s: the server hangs up


# --- the app misbehaving, the client going away ---------------------------------------------


async def test_an_app_that_raises_gets_500_and_the_server_keeps_serving(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get("/raise"))
            assert (await peer.answer()).status == 500
            await peer.closed()
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get())
            assert (await peer.answer()).status == 200
    [record] = errors(caplog)
    assert record.name == "tmg.http"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_an_app_that_returns_without_answering_gets_500(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get("/silent"))
            assert (await peer.answer()).status == 500
            await peer.closed()
    assert errors(caplog) == []


async def disconnect_mid_stream(url: str, app: App) -> None:
    peer = await connect(url)
    async with peer.stream:
        await peer.send(get("/endless"))
        await peer.stream.receive_some(65536)  # the answer has begun
    await app.endless_done.wait()


async def test_a_client_leaving_mid_stream_does_not_crash_the_server(url: str, app: App) -> None:
    with trio.fail_after(5):
        await disconnect_mid_stream(url, app)
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get())
            assert (await peer.answer()).status == 200


async def test_a_client_leaving_mid_stream_is_not_logged_as_an_error(
    url: str, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(5):
        await disconnect_mid_stream(url, app)
    assert errors(caplog) == []


# --- graceful shutdown ----------------------------------------------------------------------


async def test_shutdown_stops_accepting_closes_idle_and_finishes_requests(app: App) -> None:
    stop = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, app, shutdown_trigger=stop.wait)
            idle = await connect(url)
            busy = await connect(url)
            async with idle.stream, busy.stream:
                await idle.send(get())
                assert (await idle.answer()).status == 200
                await busy.send(get("/slow"))
                await app.entered.wait()
                stop.set()
                await trio.testing.wait_all_tasks_blocked()
                await idle.closed()  # the idle keep-alive connection is closed
                try:  # and no new connection is served
                    late = await connect(url)
                except OSError:
                    pass
                else:
                    async with late.stream:
                        await late.send(get())
                        with pytest.raises(trio.BrokenResourceError):
                            await late.closed()  # a reset is fine, an answer is not
                app.gate.set()  # the request in progress still completes
                answer = await busy.answer()
                assert answer.status == 200
                assert answer.json()["path"] == "/slow"
                await busy.closed()
    assert app.lifespan == ["startup", "shutdown"]


# --- the lifespan protocol is optional in ASGI ----------------------------------------------


async def no_lifespan_return(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # the usual way to say "no lifespan support"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def no_lifespan_raise(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        raise ValueError(f"unsupported scope {scope['type']}")
    await no_lifespan_return(scope, receive, send)


@pytest.mark.parametrize("asgi", [no_lifespan_return, no_lifespan_raise])
async def test_an_app_without_lifespan_support_is_still_served(
    asgi: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(5):  # virtual time: nothing here waits on a socket
        url = await serve(nursery, asgi)
    assert url.startswith("http://127.0.0.1:")


# --- Expect: 100-continue corner cases (RFC 9110 10.1.1) -------------------------------------


async def test_expect_100_continue_with_a_body_too_large_gets_413_without_100(
    app: App, nursery: trio.Nursery
) -> None:
    url = await serve(nursery, app, limits=ServerLimits(max_body_bytes=10))
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 99\r\n\r\n"
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(head)
            answer = await peer.answer()
    assert answer.status == 413
    assert answer.informational == []  # the client must not be invited to send the body


async def test_expect_100_continue_is_ignored_on_http_1_0(url: str) -> None:
    request = b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(request)
            answer = await peer.answer()
    assert answer.status == 200
    assert answer.informational == []


# --- the real gateway app -------------------------------------------------------------------


async def test_the_gateway_app_answers_health_through_this_server() -> None:
    with trio.fail_after(5):
        async with open_gateway() as gateway, trio.open_nursery() as nursery:
            [url] = await nursery.start(functools.partial(serve_api, gateway, bind="127.0.0.1:0"))
            peer = await connect(url)
            async with peer.stream:
                await peer.send(get("/health"))
                answer = await peer.answer()
            nursery.cancel_scope.cancel()
    assert answer.status == 200
    assert answer.body == b"OK"


# --- fuzzing --------------------------------------------------------------------------------

BASES = [
    get("/echo?x=1"),
    b"GET / HTTP/1.0\r\n\r\n",
    post(b"hello"),
    b"POST /echo HTTP/1.1\r\nHost: t\r\n"
    + CHUNKED
    + b"\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
]
SNIPPETS = st.sampled_from([b"\r", b"\n", b"\x00", b"\r\n", b" ", b":", b";", b"\t", b"\r\n\r\n"])
CHUNK_SIZES = st.sampled_from([b"zz", b"-1", b"1" * 17, b"", b"5 ; x", b"0x5", b"ffffffff", b"3"])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "insert", "delete", "header", "chunk", "pipeline"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(SNIPPETS | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "header":
            line = draw(st.binary(max_size=30) | st.sampled_from([b"Content-Length: 3", CHUNKED]))
            after = data.find(b"\r\n") + 2 if b"\r\n" in data else 0
            data[after:after] = line.rstrip(b"\r\n") + b"\r\n"
        elif op == "chunk":
            end = data.find(b"\r\n\r\n")
            end = len(data) if end < 0 else end + 4
            data[end:end] = draw(CHUNK_SIZES) + b"\r\n"
        else:
            data += draw(st.sampled_from(BASES))
    return bytes(data)


def parse_answers(data: bytes, *, complete: bool) -> list[int]:
    """The statuses in ``data``; fails unless it is a run of well-formed answers (then EOF)."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if complete:
        conn.receive_data(b"")
    statuses: list[int] = []
    while True:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is h11.IDLE:
            if not conn.trailing_data[0]:
                return statuses
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA:
            assert not complete, "the server closed in the middle of an answer"
            return statuses  # the connection was reset: a prefix is all we can check
        if isinstance(event, h11.ConnectionClosed):
            return statuses
        if isinstance(event, h11.InformationalResponse | h11.Response):
            statuses.append(event.status_code)


async def probe(port: int, payload: bytes) -> list[int]:
    """Send ``payload`` then EOF; the server must answer well-formed and close, never hang."""
    received = b""
    reset = False
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            try:
                await stream.send_all(payload)
                # A half-close while a request runs cancels it (the client went away): let the
                # server finish what it can first, so each answer the payload earns is sent.
                await trio.testing.wait_all_tasks_blocked()
                await stream.send_eof()
                while data := await stream.receive_some(65536):
                    received += data
            except trio.BrokenResourceError:
                reset = True  # the server closed before reading everything: a close is fine
    statuses = parse_answers(received, complete=not reset)
    assert set(statuses) <= ALLOWED, statuses
    return statuses


def test_the_answer_parser_used_by_the_fuzz_is_strict() -> None:
    good = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
    assert parse_answers(good * 2, complete=True) == [200, 200]
    assert parse_answers(good[:-1], complete=False) == [200]
    with pytest.raises((AssertionError, h11.RemoteProtocolError)):
        parse_answers(good[:-1], complete=True)
    with pytest.raises(h11.RemoteProtocolError):
        parse_answers(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", complete=True)


async def test_fuzzed_requests_get_well_formed_answers_or_a_close_and_never_a_hang(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(url)
    seen: set[int] = set()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=st.binary(max_size=300) | mutated())
    def fuzz(payload: bytes) -> None:
        seen.update(trio.from_thread.run(probe, port, payload))

    # Hypothesis drives from a worker thread; every probe runs here, against one server.
    await trio.to_thread.run_sync(fuzz)
    assert {200, 400} <= seen  # the mutations reached both the app and the refusals
    with trio.fail_after(5):
        peer = await connect(url)
        async with peer.stream:
            await peer.send(get())
            assert (await peer.answer()).status == 200
    assert errors(caplog) == []
