"""The server's framing decisions against a reference parser, on 1,200 generated requests.

The server parses with llhttp (httptools); the reference is h11, an independent parser, with the
server's documented extra rules (api/http/parse.py's docstring) applied to its verdict, plus
llhttp's own refusal of control characters in header values, which h11 lets through: those only
ever turn an h11 "accept" into "refuse". Each request goes over a real socket to the real
server; the app records the body it received. Same verdict, same body length, every time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import h11
import trio
import trio.testing

from tests.asgi_apps import BodyLengths, serve

SEED = 20240607
COUNT = 1200
KNOWN_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}


@dataclass
class Case:
    data: bytes
    extra_refusal: list[str] = field(default_factory=list)  # our rules that refuse it


def generate(rng: random.Random) -> Case:
    """One request, mostly well-formed, with a few of the usual suspects mixed in."""
    case = Case(b"")
    pick = rng.random
    method = rng.choice(["GET", "POST", "POST", "PUT", "get", "G(T", "PATCH"])
    if method not in KNOWN_METHODS:
        case.extra_refusal.append("method")
    target = rng.choice(["/x", "/a?b=1", "/p%20q", "/x", "*", "http://t/x"])
    if not target.startswith("/"):
        case.extra_refusal.append("target")
    version = rng.choice(["1.1"] * 6 + ["1.0"] * 2 + ["2.0", "0.9"])
    if version not in ("1.0", "1.1"):
        case.extra_refusal.append("version")
    eol = b"\r\n"
    lines = [f"{method} {target} HTTP/{version}".encode()]
    hosts = rng.choice([1] * 8 + [0, 2])
    if hosts > 1:
        case.extra_refusal.append("two Hosts")
    lines += [b"Host: t"] * hosts
    body = b"hello world"[: rng.randint(0, 11)]
    framing = rng.choice(["none", "cl", "cl", "cl", "te", "te", "te", "weird"])
    payload = b""
    if framing == "cl":
        value = rng.choice([b"%d" % len(body)] * 6 + [b"%dx" % len(body), b"+%d" % len(body)])
        lines.append(b"Content-Length: " + value)
        if pick() < 0.1:
            lines.append(b"Content-Length: " + value)
            case.extra_refusal.append("repeated Content-Length")
        payload = body
    elif framing == "te":
        coding = rng.choice([b"chunked"] * 5 + [b"CHUNKED", b"gzip, chunked", b"chunked, gzip"])
        lines.append(b"Transfer-Encoding: " + coding)
        if coding.lower() != b"chunked":
            case.extra_refusal.append("coding")
        if version == "1.0":
            case.extra_refusal.append("Transfer-Encoding on 1.0")
        if pick() < 0.08:
            lines.append(b"Content-Length: %d" % len(body))
            case.extra_refusal.append("Content-Length and Transfer-Encoding")
        payload = chunked(rng, body, case)
    elif framing == "weird":
        kind = rng.choice(["fold", "space", "ctl", "barelf", "emptyname"])
        if kind == "fold":
            lines += [b"X-A: 1", b" folded"]
            case.extra_refusal.append("obs-fold")
        elif kind == "space":
            lines.append(b"X-A : 1")
        elif kind == "ctl":
            lines.append(b"X-A: a\x01b")
            case.extra_refusal.append("control character in a value")  # llhttp's rule
        elif kind == "barelf":
            lines[-1] += b"\nX-B: 2"
            case.extra_refusal.append("bare LF")
        else:
            lines.append(b": v")
    if pick() < 0.3:
        lines.append(b"X-Trace: %d" % rng.randint(0, 10**6))
    case.data = eol.join(lines) + eol + eol + payload
    return case


def chunked(rng: random.Random, body: bytes, case: Case) -> bytes:
    out = b""
    rest = body
    while rest:
        n = rng.randint(1, len(rest))
        size = rng.choice([b"%x" % n] * 6 + [b"%X" % n, b"%x;ext=1" % n, b" %x" % n, b"%x " % n])
        if size != size.strip():
            case.extra_refusal.append("blank around a chunk size")
        out += size + b"\r\n" + rest[:n] + b"\r\n"
        rest = rest[n:]
    out += b"0\r\n"
    if rng.random() < 0.2:
        out += b"X-T: 1\r\n"
    return out + b"\r\n"


def reference(data: bytes) -> int | None:
    """h11's verdict: the body length of the first request, or None if it refuses it (or
    would wait for more: the server then gets EOF mid-request and refuses it too)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    length = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Data):
                length += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return length
    except h11.RemoteProtocolError:
        return None


async def verdict(port: int, data: bytes) -> int:
    """The status of the server's first answer to ``data`` (sent, then EOF)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        await trio.testing.wait_all_tasks_blocked()  # everything it can do without EOF, done
        await stream.send_eof()
        received = b""
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # closed with bytes unread: what arrived before the reset is enough
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", received)
    assert match, received
    return int(match.group(1))


def test_the_generator_makes_both_kinds_of_request() -> None:
    rng = random.Random(SEED)
    cases = [generate(rng) for _ in range(COUNT)]
    accepted = [c for c in cases if reference(c.data) is not None and not c.extra_refusal]
    assert 150 < len(accepted) < COUNT - 300
    assert len({c.data for c in cases}) > COUNT // 2


async def test_the_server_frames_generated_requests_as_the_reference_does(
    nursery: trio.Nursery,
) -> None:
    app = BodyLengths()
    url = await serve(nursery, app)
    port = int(url.rsplit(":", 1)[1])
    rng = random.Random(SEED)
    mismatches = []
    for _ in range(COUNT):
        case = generate(rng)
        expected = None if case.extra_refusal else reference(case.data)
        before = len(app.lengths)
        with trio.fail_after(5):
            status = await verdict(port, case.data)
        got = app.lengths[before] if status == 204 else None
        assert status == 204 or 400 <= status < 600
        if got != expected:
            mismatches.append((case.data, case.extra_refusal, expected, status, got))
    assert mismatches[:5] == []
    assert len(mismatches) == 0
