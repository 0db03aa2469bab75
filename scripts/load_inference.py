"""``loadtest.py --mode inference``: N keep-alive connections, one inference request at a time.

Each connection is a trio task on its own raw TCP stream: request bytes built once, one
``send_all``, a minimal but correct response parser (status line, headers, then Content-Length,
chunked or until-close framing; SSE ``data:`` events counted). Requests ending after ``--warmup``
are counted; failures during it go to ``warmup_failures``. Imports no gateway code."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import time
from typing import NamedTuple
from urllib.parse import urlsplit

import trio

RECV_SIZE = 65536
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class Exchange(NamedTuple):  # one request; times are time.perf_counter() values
    status: int
    sent: float
    first: float  # first response byte (streams: first body byte)
    last: float  # last response byte
    events: int  # SSE events with a data: line (2xx streams only)


class ProtocolError(Exception):  # the server broke HTTP/1.1 framing
    pass


class ServerClosed(Exception):  # EOF before the response was complete
    pass


def percentile_ms(samples: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of seconds, in milliseconds (None without samples)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1] * 1000, 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("--mode inference (with --url and --duration)").add_argument
    add("--connections", type=int, default=1, help="concurrent keep-alive connections")
    add("--stream", action="store_true", help='send "stream": true and count SSE events')
    add("--max-tokens", type=int, default=10)
    add("--model", default="fake-model")
    add("--path", default="/v1/chat/completions", help="chat in the path: messages, else prompt")
    add("--warmup", type=float, default=1.0, help="seconds run first and not counted")
    add("--request-timeout", type=float, default=30.0, help="seconds before a request is an error")
    add(
        "--server-pid",
        type=_pids,
        default=None,
        help="report these processes' CPU ms per request, summed (comma list of pids)",
    )
    add(
        "--worker-pid",
        type=_pids,
        default=None,
        help="report these processes' CPU ms per request too (the worker's side)",
    )


def build_request(args: argparse.Namespace) -> tuple[str, int, bytes]:
    """(host, port, the whole request: head and JSON body, the bytes sent for every request)."""
    parts, path = urlsplit(args.gateway), args.path
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--url must be http://HOST[:PORT], not {args.gateway!r}")
    body = {"model": args.model, "max_tokens": args.max_tokens, "stream": args.stream}
    prompt = "Say hello."
    chat = {"messages": [{"role": "user", "content": prompt}]}
    body |= chat if "chat" in path else {"prompt": prompt}
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return parts.hostname, parts.port or 80, head.encode("latin-1") + data


def parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, Content-Length or None, chunked, close afterwards) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = int(rest[:3]) if rest[:3].isdecimal() and rest[3:4] in ("", " ") else 0
    if version not in ("HTTP/1.1", "HTTP/1.0") or not 100 <= code <= 599 or code == 101:
        raise ProtocolError(f"unexpected status line {lines[0][:40]!r}")
    length: int | None = None
    chunked, coded, close = False, False, version == "HTTP/1.0"
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:40]!r}")
        name, value = name.lower(), value.strip().lower()
        if name == "content-length":
            if not value.isdecimal() or len(value) > 18 or length not in (None, int(value)):
                raise ProtocolError(f"bad content-length {value[:20]!r}")
            length = int(value)
        elif name == "transfer-encoding":  # overrides Content-Length; not chunked: runs to EOF
            chunked, coded = value.rsplit(",", 1)[-1].strip() == "chunked", True
        elif name == "connection":
            tokens = {token.strip() for token in value.split(",")}
            close = "close" in tokens or (close and "keep-alive" not in tokens)
    return code, None if coded else length, chunked, close


class Connection:
    """One keep-alive connection; ``exchange`` sends the request and reads one whole response."""

    def __init__(self, host: str, port: int, request: bytes, stream: bool) -> None:
        self.host, self.port, self.request, self.stream_mode = host, port, request, stream
        self.sock: trio.SocketStream | None = None
        self.buf = b""
        self.received_at = 0.0  # when the last receive returned
        self.first, self.body_at = 0.0, 0  # when a byte at or after buf[body_at] first arrived
        self.reused = False  # this connection already carried a whole response
        self.opened = 0  # TCP connections opened so far

    async def close(self) -> None:
        if self.sock is not None:
            await trio.aclose_forcefully(self.sock)
        self.sock, self.buf, self.reused = None, b"", False

    async def _more(self) -> None:
        assert self.sock is not None
        data = await self.sock.receive_some(RECV_SIZE)
        self.received_at = time.perf_counter()
        if not data:
            raise ServerClosed
        self.buf += data
        if not self.first and len(self.buf) > self.body_at:
            self.first = self.received_at

    async def exchange(self) -> Exchange:
        """Send the request, read the whole response; the connection stays open unless told."""
        if self.sock is None:
            self.opened += 1
            self.sock = await trio.open_tcp_stream(self.host, self.port)
        sent, self.first, self.body_at = time.perf_counter(), 0.0, 0
        await self.sock.send_all(self.request)
        pos = status = 0
        while status < 200:  # interim 1xx responses are skipped
            while (end := self.buf.find(b"\r\n\r\n", pos)) < 0:
                await self._more()
            status, length, chunked, close = parse_head(self.buf[pos:end])
            pos = end + 4
        if self.stream_mode:  # a stream's first byte is its first body byte
            self.first, self.body_at = (self.received_at if len(self.buf) > pos else 0.0), pos
        parts: list[bytes] = []
        if status in (204, 304):
            pass
        elif chunked:
            while True:
                while (eol := self.buf.find(b"\r\n", pos)) < 0:
                    await self._more()
                size_field = self.buf[pos:eol].split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size_field):
                    raise ProtocolError(f"bad chunk size {size_field[:20]!r}")
                size, pos = int(size_field, 16), eol + 2
                if size == 0:  # the last chunk: trailers, if any, then a blank line
                    while (end := self.buf.find(b"\r\n\r\n", eol)) < 0:
                        await self._more()
                    pos = end + 4
                    break
                while len(self.buf) < pos + size + 2:
                    await self._more()
                if self.buf[pos + size : pos + size + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                parts.append(self.buf[pos : pos + size])
                pos += size + 2
        elif length is not None:
            while len(self.buf) < pos + length:
                await self._more()
            parts.append(self.buf[pos : pos + length])
            pos += length
        else:  # no framing: the body runs until the server closes
            close = True
            with contextlib.suppress(ServerClosed):
                while True:
                    await self._more()
            parts.append(self.buf[pos:])
            pos = len(self.buf)
        if len(self.buf) > pos:
            raise ProtocolError(f"{len(self.buf) - pos} bytes after the response")
        self.buf, self.reused, last = b"", True, self.received_at
        events = 0
        if self.stream_mode and 200 <= status < 300:  # blocks with a data: line are SSE events
            blocks = b"".join(parts).replace(b"\r\n", b"\n").split(b"\n\n")
            events = sum(b.startswith(b"data:") or b"\ndata:" in b for b in blocks)
        if close:
            await self.close()
        return Exchange(status, sent, self.first or last, last, events)

    async def exchange_retrying_stale(self) -> Exchange:
        """``exchange()``, once more on a new connection when the server had closed an idle
        keep-alive connection (EOF or reset before any byte of the response)."""
        try:
            return await self.exchange()
        except (ServerClosed, trio.BrokenResourceError):
            if not self.reused or self.buf:
                raise
        await self.close()
        return await self.exchange()


class Tally:
    """What the connections saw; only requests ending at or after ``window_start`` are counted."""

    def __init__(self) -> None:
        self.window_start = math.inf
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.events: list[int] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.warmup_failures = 0

    def add(self, done: Exchange, stream: bool) -> None:
        ok = 200 <= done.status < 300
        if done.last < self.window_start:
            self.warmup_failures += not ok
            return
        self.statuses[str(done.status)] += 1
        self.latencies.append(done.last - done.sent)
        self.ttfbs.append(done.first - done.sent)
        if stream and ok:
            self.events.append(done.events)


async def connection_task(conn: Connection, tally: Tally, request_timeout: float) -> None:
    """Send requests back to back until cancelled; on an error, count it and reconnect."""
    try:
        while True:
            try:
                with trio.fail_after(request_timeout):
                    done = await conn.exchange_retrying_stale()
            except (
                OSError,
                ServerClosed,
                ProtocolError,
                trio.BrokenResourceError,
                trio.TooSlowError,
            ) as error:
                kind = "timeout" if isinstance(error, trio.TooSlowError) else type(error).__name__
                if time.perf_counter() >= tally.window_start:
                    tally.errors["connect" if kind == "OSError" else kind] += 1
                else:
                    tally.warmup_failures += 1
                await conn.close()
                if isinstance(error, OSError):  # only connecting raises it: do not spin
                    await trio.sleep(0.05)
                continue
            tally.add(done, conn.stream_mode)
    finally:
        await conn.close()


def _pids(text: str) -> list[int]:
    try:
        pids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of pids, not {text!r}") from None
    return pids


def cpu_of(pids: list[int] | None) -> float:
    """The CPU seconds of ``pids`` together (0 for None)."""
    return sum(cpu_seconds(pid) for pid in pids or ())


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` from /proc/PID/stat, in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError as error:
        raise SystemExit(f"--server-pid {pid}: {error}") from None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def run_inference(args: argparse.Namespace) -> dict[str, object]:
    host, port, request = build_request(args)
    tally, marks = Tally(), []  # marks: (wall clock, own CPU, server CPU) at both window ends

    def server_cpu() -> tuple[float, float]:
        return cpu_of(args.server_pid), cpu_of(args.worker_pid)

    server_cpu()  # a wrong --server-pid fails now, not after the run
    conns = [Connection(host, port, request, args.stream) for _ in range(args.connections)]
    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(connection_task, conn, tally, args.request_timeout)
        for pause in (args.warmup, args.duration):
            await trio.sleep(pause)
            marks.append((time.perf_counter(), time.process_time(), server_cpu()))
            tally.window_start = marks[0][0]
        nursery.cancel_scope.cancel()
    (start, cpu0, server0), (end, cpu1, server1) = marks
    seconds, requests = max(end - start, 1e-9), len(tally.latencies)
    per_request_ms = 1000 / max(requests, 1)
    figures: dict[str, object] = {
        "url": args.gateway,
        "path": args.path,
        "stream": args.stream,
        "connections": args.connections,
        "seconds": round(seconds, 3),
        "requests": requests,
        "rps": round(requests / seconds, 1),
        "p50_ms": percentile_ms(tally.latencies, 50),
        "p99_ms": percentile_ms(tally.latencies, 99),
        "ttfb_p50_ms": percentile_ms(tally.ttfbs, 50),
        "ttfb_p99_ms": percentile_ms(tally.ttfbs, 99),
        "statuses": dict(sorted(tally.statuses.items())),
        "errors": dict(sorted(tally.errors.items())),
        "warmup_failures": tally.warmup_failures,
        "reconnects": sum(conn.opened for conn in conns) - len(conns),
    }
    non_2xx = sum(n for code, n in tally.statuses.items() if not code.startswith("2"))
    figures["failures"] = non_2xx + tally.errors.total() + tally.warmup_failures
    if args.stream:
        events = tally.events
        figures["events_per_stream"] = round(sum(events) / len(events), 2) if events else None
    figures["client_cpu_ms_per_request"] = round((cpu1 - cpu0) * per_request_ms, 3)
    if args.server_pid:
        figures["server_cpu_ms_per_request"] = round((server1[0] - server0[0]) * per_request_ms, 3)
    if args.worker_pid:
        figures["worker_cpu_ms_per_request"] = round((server1[1] - server0[1]) * per_request_ms, 3)
    return figures
