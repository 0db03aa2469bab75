"""HTTP/1.1 framing for the fake worker (``scripts/fake_worker.py``): h11 events over a trio stream.

Reading events, writing a ``Reply`` (JSON body, or chunked SSE then ``[DONE]``) and lingering on
close; the request loop, routing and counting stay in the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

import h11
import trio

from scripts.fake_payloads import Reply

RECV_SIZE = 65536
_DONE = b"data: [DONE]\n\n"
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def send_events(conn: h11.Connection, *events: h11.Event) -> bytes:
    return b"".join(conn.send(event) or b"" for event in events)


async def next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(RECV_SIZE))
    return event


async def linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain what the peer still sends, so our last bytes are not reset away."""
    with trio.move_on_after(2):
        await stream.send_eof()
        while await stream.receive_some(RECV_SIZE):
            pass


async def send_reply(
    conn: h11.Connection,
    stream: trio.SocketStream,
    reply: Reply,
    *,
    port_header: bytes,
    token_delay: Callable[[], float],
    close: bool,
) -> None:
    """Send ``reply``; ``token_delay()`` (seconds between SSE chunks) is read before each chunk."""
    headers = [(b"x-fake-worker-port", port_header), *reply.headers]
    if close:
        headers.append((b"connection", b"close"))
    if reply.sse is None:
        if reply.body:
            headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", str(len(reply.body)).encode()))
    else:
        headers += [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    reason = _REASONS.get(reply.status, b"")
    head = send_events(conn, h11.Response(status_code=reply.status, headers=headers, reason=reason))
    if reply.sse is None:
        body = send_events(conn, h11.Data(data=reply.body), h11.EndOfMessage())
        await stream.send_all(head + body)
        return
    for i, chunk in enumerate(reply.sse):  # one write per token; the head rides on the first
        if i and token_delay() > 0:
            await trio.sleep(token_delay())
        await stream.send_all(head + send_events(conn, h11.Data(data=chunk)))
        head = b""
    await stream.send_all(head + send_events(conn, h11.Data(data=_DONE), h11.EndOfMessage()))
