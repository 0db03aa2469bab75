"""HTTP/1.1 request parsing and response heads for api/http1.py (hand-written, fuzzed).

Strict where leniency is a risk: a request with both Content-Length and Transfer-Encoding, with
conflicting lengths, with folded or malformed header lines, with a transfer coding other than
chunked, or without Host on HTTP/1.1 is refused (request smuggling and desync need ambiguity).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import trio

RECV = 65536
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    raw_path: bytes
    path: str
    query: bytes
    version: str  # "1.1" or "1.0"
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expects_continue: bool


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


class Reader:
    """Reads requests off one connection, keeping bytes that arrive early (pipelining)."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_head: int, max_headers: int) -> None:
        self._stream = stream
        self._buffer = b""
        self._max_head = max_head
        self._max_headers = max_headers

    async def wait_for_data(self) -> bool:
        """False when the peer closed before sending anything more."""
        if self._buffer:
            return True
        data = await self._stream.receive_some(RECV)
        self._buffer = bytes(data)
        return bool(data)

    async def read_head(self) -> Head:
        self._buffer = self._buffer.lstrip(b"\r\n")  # empty lines before a request: ignored
        searched = 0
        while (end := self._buffer.find(b"\r\n\r\n", searched)) < 0:
            if len(self._buffer) > self._max_head:
                raise BadRequest(431, "the request head is too large")
            searched = max(0, len(self._buffer) - 3)
            data = await self._stream.receive_some(RECV)
            if not data:
                raise BadRequest(400, "the connection closed in the middle of a request head")
            self._buffer += data
        if end > self._max_head:
            raise BadRequest(431, "the request head is too large")
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        return parse_head(head, self._max_headers)

    async def read_body(self, head: Head, max_body: int) -> bytes:
        if head.chunked:
            return await self._read_chunked(max_body)
        length = head.content_length or 0
        if length > max_body:
            raise BadRequest(413, f"the body is over {max_body} bytes")
        while len(self._buffer) < length:
            data = await self._stream.receive_some(RECV)
            if not data:
                raise BadRequest(400, "the connection closed in the middle of a request body")
            self._buffer += data
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return body

    async def wait_for_eof(self) -> None:
        """Return when the peer closes; bytes it sends meanwhile are kept for the next request."""
        while len(self._buffer) <= self._max_head:
            data = await self._stream.receive_some(RECV)
            if not data:
                return
            self._buffer += data
        await trio.sleep_forever()  # enough is buffered: stop reading (backpressure)

    async def _line(self, limit: int) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > limit:
                raise BadRequest(400, "a chunk line is too long")
            data = await self._stream.receive_some(RECV)
            if not data:
                raise BadRequest(400, "the connection closed in the middle of a chunked body")
            self._buffer += data
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        if _BAD_VALUE.search(line):  # a bare LF or control byte: framing others may read apart
            raise BadRequest(400, "a chunk or trailer line holds a control character")
        return line

    async def _read_chunked(self, max_body: int) -> bytes:
        pieces: list[bytes] = []
        total = 0
        while True:
            size_text = (await self._line(1024)).split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or not _is_hex(size_text):
                raise BadRequest(400, "a chunk size is not a hexadecimal number")
            size = int(size_text, 16)
            total += size
            if total > max_body:
                raise BadRequest(413, f"the body is over {max_body} bytes")
            if size == 0:
                for _ in range(self._max_headers + 1):  # trailers: checked, then dropped
                    trailer = await self._line(self._max_head)
                    if not trailer:
                        return b"".join(pieces)
                    name, colon, _ = trailer.partition(b":")
                    if not colon or not _TOKEN.match(name):
                        raise BadRequest(400, "a trailer line is malformed")
                raise BadRequest(431, f"more than {self._max_headers} trailer lines")
            while len(self._buffer) < size + 2:
                data = await self._stream.receive_some(RECV)
                if not data:
                    raise BadRequest(400, "the connection closed in the middle of a chunk")
                self._buffer += data
            if self._buffer[size : size + 2] != b"\r\n":
                raise BadRequest(400, "a chunk is not followed by CRLF")
            pieces.append(self._buffer[:size])
            self._buffer = self._buffer[size + 2 :]


def _is_hex(text: bytes) -> bool:
    return all(c in b"0123456789abcdefABCDEF" for c in text)


def parse_head(data: bytes, max_headers: int) -> Head:
    lines = data.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "the request line is not 'METHOD target HTTP/version'")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise BadRequest(400, "the method is not a token")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are served")
    if not target.startswith(b"/") or _BAD_VALUE.search(target) or b" " in target:
        raise BadRequest(400, "the request target must be a path")
    if len(lines) - 1 > max_headers:
        raise BadRequest(431, f"more than {max_headers} header lines")
    headers: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    connection = b""
    host = expect = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise BadRequest(400, "a header line is malformed (or folded)")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise BadRequest(400, "a header value holds a control character")
        name = name.lower()
        headers.append((name, value))
        if name == b"content-length":
            lengths.add(value)
        elif name == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"connection":
            connection += b"," + value.lower()
        elif name == b"host":
            host = True
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
    if lengths and codings:
        raise BadRequest(400, "both Content-Length and Transfer-Encoding are set")
    content_length = None
    if lengths:
        if len(lengths) > 1 or not all(v.isdigit() and len(v) < 19 for v in lengths):
            raise BadRequest(400, "the Content-Length is invalid or conflicting")
        content_length = int(lengths.pop())
    if codings and codings != [b"chunked"]:
        raise BadRequest(501, "only the chunked transfer coding is understood")
    if version == b"HTTP/1.1" and not host:
        raise BadRequest(400, "HTTP/1.1 needs a Host header")
    tokens = {token.strip() for token in connection.split(b",")}
    keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
    raw_path, _, query = target.partition(b"?")
    return Head(
        method=method.decode("ascii"),
        raw_path=raw_path,
        path=unquote(raw_path.decode("latin-1"), encoding="utf-8", errors="replace"),
        query=query,
        version=version[5:].decode("ascii"),
        headers=headers,
        content_length=content_length,
        chunked=bool(codings),
        keep_alive=keep_alive,
        expects_continue=expect,
    )


class DateHeader:
    """The Date header's value, formatted once a second (a server owns one)."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


def serialize_head(
    status: int, headers: list[tuple[bytes, bytes]], content_length: int | None, date: bytes
) -> bytes:
    """A response head; refuses a header that would break the framing (CR/LF in it)."""
    out = [b"HTTP/1.1 %d %b\r\ndate: %b\r\n" % (status, reason(status), date)]
    for name, value in headers:
        if b"\n" in name or b"\r" in name or b"\n" in value or b"\r" in value:
            raise ValueError(f"a response header holds CR/LF: {name!r}")
        out.append(b"%b: %b\r\n" % (name, value))
    if content_length is not None:
        out.append(b"content-length: %d\r\n" % content_length)
    out.append(b"\r\n")
    return b"".join(out)


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return None


def address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
