"""scripts/loadtest.py --mode inference (scripts/load_inference.py): end to end as a subprocess
against our gateway and fake workers served from this test's trio loop, and its HTTP/1.1 response
parser against a canned server, over real sockets on OS-chosen ports."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import api.serve
from actors import open_gateway, worker_spec
from scripts.fake_worker import FakeWorkerConfig, serve_fake_workers
from scripts.load_inference import Connection, Exchange, ProtocolError, parse_head

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 3
# The fake worker streams one SSE event per token (max_tokens of them, no usage event unless
# stream_options.include_usage is sent, which loadtest.py does not) and then `data: [DONE]`.
EVENTS = MAX_TOKENS + 1


@asynccontextmanager
async def served_gateway() -> AsyncIterator[str]:
    """Our gateway's HTTP API with two ready fake workers serving model "m": its base URL."""
    async with open_gateway() as gateway, trio.open_nursery() as nursery:
        workers = await nursery.start(serve_fake_workers, [0, 0], FakeWorkerConfig(model="m"))
        for worker in workers:
            added = gateway.add_worker(worker_spec(f"127.0.0.1:{worker.port}"))
            await gateway.wait_status((await added).id, "ready", 5)
        serve = functools.partial(api.serve.serve_api, gateway, bind="127.0.0.1:0")
        [url] = await nursery.start(serve)
        yield url
        nursery.cancel_scope.cancel()


async def inference_load(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run loadtest.py --mode inference (4 connections, ~1 s): its exit code and its JSON line."""
    result = await trio.run_process(
        [
            sys.executable,
            "scripts/loadtest.py",
            "--mode",
            "inference",
            "--url",
            url,
            "--connections",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            *args,
        ],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, (lines, result.stderr.decode())
    figures: dict[str, Any] = json.loads(lines[0])
    return result.returncode, figures


async def test_inference_load_through_the_gateway_sees_only_200s_and_every_sse_event() -> None:
    options = ("--model", "m", "--max-tokens", str(MAX_TOKENS), "--server-pid", str(os.getpid()))
    with trio.fail_after(60):
        async with served_gateway() as url:
            plain_code, plain = await inference_load(url, *options)
            stream_code, stream = await inference_load(url, *options, "--stream")
    for figures in (plain, stream):
        assert figures["benchmark"] == "loadtest_inference" and figures["connections"] == 4
        assert figures["url"] == url and figures["path"] == "/v1/chat/completions"
        assert figures["requests"] > 0 and figures["rps"] > 0, figures
        assert figures["statuses"] == {"200": figures["requests"]}, figures
        assert (figures["errors"], figures["warmup_failures"], figures["failures"]) == ({}, 0, 0)
        assert 0 < figures["ttfb_p50_ms"] <= figures["p99_ms"]
        assert figures["p50_ms"] <= figures["p99_ms"]
        assert figures["client_cpu_ms_per_request"] > 0
        assert figures["server_cpu_ms_per_request"] > 0  # this process served every request
    assert plain["stream"] is False and "events_per_stream" not in plain
    assert stream["stream"] is True and stream["events_per_stream"] == EVENTS, stream
    assert (plain_code, stream_code) == (0, 0)


async def test_a_model_nobody_serves_is_counted_as_404s_and_exit_code_1() -> None:
    with trio.fail_after(60):
        async with served_gateway() as url:
            code, figures = await inference_load(url, "--model", "nobody-serves-this")
    assert code == 1
    assert figures["requests"] > 0 and figures["statuses"] == {"404": figures["requests"]}
    assert figures["errors"] == {} and figures["failures"] >= figures["requests"]


async def test_a_server_that_cannot_be_reached_is_counted_as_errors_and_exit_code_1() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nobody listens on that port now
    with trio.fail_after(60):
        code, figures = await inference_load(f"http://127.0.0.1:{port}")
    assert code == 1
    assert figures["requests"] == 0 and figures["statuses"] == {}
    assert figures["errors"]["connect"] > 0, figures


# ---- the response parser, against a server that sends canned bytes ----

REQUEST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def canned(
    replies: list[tuple[list[bytes], bool]], *, task_status: trio.TaskStatus[int]
) -> None:
    """Answer each request with the next reply (sent in the given pieces), closing the connection
    afterwards when its flag is set; the listening port goes to ``task_status``."""
    queue = iter(replies)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            for pieces, close in queue:
                received = b""
                while len(received) < len(REQUEST):
                    if not (data := await stream.receive_some(65536)):
                        return
                    received += data
                assert received == REQUEST
                for piece in pieces:
                    await stream.send_all(piece)
                if close:
                    return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def exchanges(
    nursery: trio.Nursery, replies: list[tuple[list[bytes], bool]], stream: bool = False
) -> tuple[list[Exchange], Connection]:
    port = await nursery.start(canned, replies)
    conn = Connection("127.0.0.1", port, REQUEST, stream)
    try:
        with trio.fail_after(10):
            return [await conn.exchange_retrying_stale() for _ in replies], conn
    finally:
        await conn.close()


async def test_every_framing_is_read_to_its_end(nursery: trio.Nursery) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    done, conn = await exchanges(
        nursery,
        [
            ([b"HTTP/1.1 100 Continue\r\n\r\n", OK], False),  # interim answers are skipped
            (
                [
                    chunked + b"9;ext=1\r\ndata: a\n\n\r\n",
                    b"E\r\ndata: [DONE]\n\n\r\n",
                    b"0\r\nX-Trailer: t\r\n\r\n",
                ],
                False,
            ),
            ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n"], False),
            ([b"HTTP/1.0 200 OK\r\n\r\nread until the server closes"], True),
            ([b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"], True),
            ([b"HTTP/1.1 204 No Content\r\n\r\n"], False),
        ],
        stream=True,
    )
    assert [d.status for d in done] == [200, 200, 200, 200, 503, 204]
    assert [d.events for d in done] == [0, 2, 0, 0, 0, 0]  # SSE events of the 2xx bodies
    assert all(d.sent <= d.first <= d.last for d in done)
    assert conn.opened == 3  # a new connection after each answer that ended with a close


async def test_a_keep_alive_connection_closed_by_the_server_is_retried_once(
    nursery: trio.Nursery,
) -> None:
    done, conn = await exchanges(nursery, [([OK], True), ([OK], True), ([OK], False)])
    assert [d.status for d in done] == [200, 200, 200]
    assert conn.opened == 3  # no Connection: close was sent, so each reuse failed and retried


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
        OK + b"extra",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
async def test_broken_framing_is_a_protocol_error(nursery: trio.Nursery, reply: bytes) -> None:
    port = await nursery.start(canned, [([reply], False)])
    conn = Connection("127.0.0.1", port, REQUEST, stream=False)
    with trio.fail_after(10), pytest.raises(ProtocolError):
        try:
            await conn.exchange()
        finally:
            await conn.close()


def test_a_response_head_gives_status_length_chunked_and_close() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12") == (200, 12, False, False)
    assert parse_head(b"HTTP/1.1 200") == (200, None, False, False)  # the reason is optional
    assert parse_head(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0") == (404, 0, False, False)
    chunked = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked"
    assert parse_head(chunked) == (200, None, True, False)  # chunked wins over Content-Length
    assert parse_head(b"HTTP/1.1 200 OK\r\nConnection: close") == (200, None, False, True)
    assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1") == (200, 1, False, True)
    alive = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1"
    assert parse_head(alive) == (200, 1, False, False)
    two_lengths = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2"
    bad_length, no_colon = b"HTTP/1.1 200 OK\r\nContent-Length: -1", b"HTTP/1.1 200 OK\r\nno"
    for bad in (b"HTTP/1.1 2OO OK", b"HTTP/1.1 2000", two_lengths, bad_length, no_colon):
        with pytest.raises(ProtocolError):
            parse_head(bad)
