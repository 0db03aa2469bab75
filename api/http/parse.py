"""Request framing for api/http/server.py: bytes in, request heads and bodies out (no I/O).

The grammar is llhttp's (Node's parser, through httptools), not ours: parsers are where request
smuggling lives, and a kept, widely fuzzed one is safer than a hand-written one. Why llhttp and not
h11: parsing one proxied request costs about 3.7 us in httptools and 80-110 us in h11 (the
benchmark's request, best of 3 x 20,000; the old hand parser: 29 us). At the gateway's 0.55-0.75
ms of CPU per proxied request here, h11 would cost 10-20 % of the throughput (api/http/server.py).
llhttp is also stricter than h11 in places we keep: it refuses control characters in header
values and unknown or lower-case methods.

Three things are ours on top of llhttp:

* **Exact message boundaries.** llhttp parses pipelined messages back to back and does not say
  where one ended. We cut the input so that a message can only end at the end of a piece fed to
  it: the head is found by its CRLFCRLF (llhttp requires CRLF line ends, so it ends there too), a
  Content-Length body is taken whole by count, and a chunked body is fed in pieces that end just
  after a CRLFCRLF, the only place a chunked message can end. A fresh llhttp parser reads each
  request, so nothing it saw carries over.
* **Stricter rules where llhttp is lenient** (each refused with 400 unless noted): more than one
  empty line before a request (llhttp skips any number, so ``"\\r\\n\\r\\n"`` would wait for
  ever), a bare LF anywhere in a head, a request line that is not exactly ``METHOD SP target SP
  version`` (two spaces, HTTP/0.9), a target that is not a path (absolute form, ``*``, CONNECT),
  a version other than 1.0/1.1 (505), a missing or repeated Host, Transfer-Encoding on HTTP/1.0,
  any transfer coding but a lone ``chunked`` (501), an Upgrade request that carries a body
  (llhttp would not frame it: we do not switch protocols, an Upgrade without a body is served as
  plain HTTP/1.1).
* **Limits**: head size (431), header and trailer count (431), body size (413).

Buffers grow by appending to one ``bytearray`` and shrink from the front (cheap in CPython), and a
chunked body is kept as a list of pieces joined once: a 32 MiB body costs linear time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

import httptools

_TERMINATOR: Final = b"\r\n\r\n"
_CR: Final = ord("\r")


class BadRequest(Exception):
    """A request we refuse: answered with ``status`` and the connection closed."""

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
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values without surrounding blanks
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expects_continue: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class _Callbacks:
    """What llhttp reports about one request."""

    __slots__ = (
        "body",
        "body_limit",
        "body_size",
        "complete",
        "count",
        "headers",
        "in_trailers",
        "limit",
        "url",
    )

    def __init__(self, max_headers: int, max_body: int) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.count = 0  # header and trailer lines
        self.limit = max_headers
        self.in_trailers = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_limit = max_body
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url  # llhttp may report it in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        if self.count > self.limit:
            raise BadRequest(431, f"more than {self.limit} header lines")
        if not self.in_trailers:  # trailers are checked by llhttp, counted, then dropped
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.in_trailers = True

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.body_limit:
            raise BadRequest(413, f"the body is over {self.body_limit} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class RequestParser:
    """The requests of one connection, in order. ``receive`` the bytes as they come, then ask
    ``read_head`` and ``read_body`` (each returns None until enough has arrived). Any refusal is
    a BadRequest; after one the connection must close."""

    def __init__(self, *, max_head: int, max_headers: int, max_body: int) -> None:
        self._buffer = bytearray()
        self._max_head = max_head
        self._max_headers = max_headers
        self._max_body = max_body
        self._blank_skipped = False  # the one empty line allowed before a request line
        self._searched = 0  # where the next search for CRLFCRLF or LF starts
        self._line_checked = False  # the request line's form was checked
        self._head: Head | None = None
        self._llhttp: httptools.HttpRequestParser | None = None
        self._callbacks: _Callbacks | None = None

    def receive(self, data: bytes) -> None:
        self._buffer += data

    @property
    def started(self) -> bool:
        """Whether bytes of a request (beyond the allowed empty line) are here or in progress."""
        return self._head is not None or bool(self._buffer)

    def read_head(self) -> Head | None:
        buffer = self._buffer
        if not self._blank_skipped and buffer[:2] == b"\r\n":
            del buffer[:2]  # RFC 9112 2.2: one empty line before a request line may be ignored
            self._blank_skipped = True
        first = buffer[:1]
        if first == b"\n" or (first == b"\r" and (self._blank_skipped or len(buffer) > 1)):
            raise BadRequest(400, "a request starts with an empty or malformed line")
        end = buffer.find(_TERMINATOR, self._searched)
        self._check_line_ends(len(buffer) if end < 0 else end + 4)
        if end < 0:
            if len(buffer) > self._max_head:
                raise BadRequest(431, "the request head is too large")
            self._searched = max(0, len(buffer) - 3)
            return None
        if end > self._max_head:
            raise BadRequest(431, "the request head is too large")
        head = self._parse_head(end + 4)
        self._searched = 0
        self._line_checked = False
        self._blank_skipped = False
        return head

    def read_body(self) -> bytes | None:
        """The body of the request whose head was read last (b"" when it has none)."""
        head = self._head
        assert head is not None, "read_head first"
        body = self._read_chunked() if head.chunked else self._read_sized(head.content_length or 0)
        if body is not None:
            self._head = self._llhttp = self._callbacks = None
        return body

    def _check_line_ends(self, end: int) -> None:
        """Refuse a bare LF, and a request line not of the form METHOD SP target SP version,
        as soon as the bytes are here (not when the head is complete: it may never be)."""
        buffer = self._buffer
        at = buffer.find(b"\n", self._searched, end)
        while at >= 0:
            if at == 0 or buffer[at - 1] != _CR:
                raise BadRequest(400, "a line of the request head ends with a bare LF")
            if not self._line_checked:
                self._line_checked = True
                parts = bytes(buffer[: at - 1]).split(b" ")
                if len(parts) != 3 or not all(parts):
                    raise BadRequest(400, "the request line is not 'METHOD target HTTP/version'")
            at = buffer.find(b"\n", at + 1, end)

    def _parse_head(self, size: int) -> Head:
        callbacks = _Callbacks(self._max_headers, self._max_body)
        parser = httptools.HttpRequestParser(callbacks)
        upgrade = False
        try:
            with memoryview(self._buffer) as view, view[:size] as piece:
                parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            upgrade = True  # llhttp stopped after the head: handled below
        except httptools.HttpParserError as error:
            raise _refusal(error) from None
        del self._buffer[:size]
        head = _head(parser, callbacks)
        if upgrade and head.has_body:
            raise BadRequest(400, "an Upgrade request with a body is not served")
        if head.content_length is not None and head.content_length > self._max_body:
            raise BadRequest(413, f"the body is over {self._max_body} bytes")
        self._head, self._llhttp, self._callbacks = head, parser, callbacks
        return head

    def _read_sized(self, length: int) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < length:
            return None
        if length == len(buffer):
            body = bytes(buffer)
            buffer.clear()
        else:
            with memoryview(buffer) as view, view[:length] as piece:
                body = bytes(piece)
            del buffer[:length]
        return body

    def _read_chunked(self) -> bytes | None:
        parser, callbacks, buffer = self._llhttp, self._callbacks, self._buffer
        assert parser is not None and callbacks is not None
        while buffer and not callbacks.complete:
            end = buffer.find(_TERMINATOR)
            if end >= 0:
                cut = end + 4  # the message may end here, never inside a piece
            else:  # no CRLFCRLF: the message cannot end in these bytes; keep what may begin one
                cut = len(buffer)
                for keep in (3, 2, 1):
                    if buffer.endswith(_TERMINATOR[:keep]):
                        cut -= keep
                        break
                if cut == 0:
                    return None
            try:
                with memoryview(buffer) as view, view[:cut] as piece:
                    parser.feed_data(piece)
            except httptools.HttpParserError as error:
                raise _refusal(error) from None
            del buffer[:cut]
        if not callbacks.complete:
            return None
        return b"".join(callbacks.body)


def _refusal(error: httptools.HttpParserError) -> BadRequest:
    cause = error.__context__
    if isinstance(cause, BadRequest):
        return cause  # one of our own callbacks refused
    text = str(error)
    if "`Transfer-Encoding`" in text:
        return BadRequest(501, "only the chunked transfer coding is understood")
    return BadRequest(400, f"malformed request: {text}")


def _head(parser: httptools.HttpRequestParser, callbacks: _Callbacks) -> Head:
    """Our rules on top of llhttp's, then the Head."""
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are served")
    target = callbacks.url
    if not target.startswith(b"/"):
        raise BadRequest(400, "the request target must be a path")
    hosts = 0
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    expect = False
    for name, value in callbacks.headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"connection":
            connection.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
    if hosts > 1 or (version == "1.1" and not hosts):
        raise BadRequest(400, "a request needs exactly one Host header (HTTP/1.0: at most one)")
    if codings and lengths:
        raise BadRequest(400, "both Content-Length and Transfer-Encoding are set")
    if codings and version == "1.0":
        raise BadRequest(400, "Transfer-Encoding is not allowed in HTTP/1.0")
    if codings and codings != [b"chunked"]:
        raise BadRequest(501, "only the chunked transfer coding is understood")
    content_length = None
    if lengths:  # llhttp refused repeats and non-digits already; this is belt and braces
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise BadRequest(400, "the Content-Length is invalid or repeated")
        content_length = int(lengths[0])
    if version == "1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection and b"close" not in connection
    raw_path, _, query = target.partition(b"?")
    return Head(
        method=parser.get_method().decode("ascii"),
        raw_path=raw_path,
        path=unquote(raw_path.decode("latin-1"), encoding="utf-8", errors="replace"),
        query=query,
        version=version,
        headers=callbacks.headers,
        content_length=content_length,
        chunked=bool(codings),
        keep_alive=keep_alive,
        expects_continue=expect and version == "1.1",
    )
