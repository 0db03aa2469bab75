"""Response framing for api/http/server.py: ASGI response messages in, bytes for the socket out.

The framing the server declares is the framing it keeps. A response with a Content-Length gets
exactly that many body bytes: if the app sends more, the excess is dropped and the connection is
closed after the response; if the app finishes with fewer, the connection is closed (the client
sees a short body, never a desynchronised keep-alive connection whose next answer starts in the
middle of this one). A response without a Content-Length is chunked (HTTP/1.1) or delimited by
closing the connection (HTTP/1.0). HEAD answers and 1xx/204/304 carry no body whatever the app
sends. The head is held back and goes out in one write with the first piece of body.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


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
    out = [b"HTTP/1.1 %d %b\r\ndate: %b\r\n" % (status, _REASONS.get(status, b""), date)]
    for name, value in headers:
        if b"\n" in name or b"\r" in name or b"\n" in value or b"\r" in value:
            raise ValueError(f"a response header holds CR/LF: {name!r}")
        out.append(b"%b: %b\r\n" % (name, value))
    if content_length is not None:
        out.append(b"content-length: %d\r\n" % content_length)
    out.append(b"\r\n")
    return b"".join(out)


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length an app declared; ValueError if it is malformed or contradictory."""
    found: int | None = None
    for name, value in headers:
        if name.lower() == b"content-length":
            if not value.strip().isdigit():
                raise ValueError(f"a response Content-Length is not a number: {value!r}")
            length = int(value)
            if found is not None and found != length:
                raise ValueError("a response declares two different Content-Lengths")
            found = length
    return found


class ResponseFramer:
    """One response: ``start`` then ``body`` per ASGI message; each returns the bytes to send."""

    __slots__ = (
        "_bodiless",
        "_chunked",
        "_date",
        "_head",
        "_pending",
        "_remaining",
        "close",
        "finished",
        "overflow",
        "started",
    )

    def __init__(self, *, method: str, version: str, keep_alive: bool, date: DateHeader) -> None:
        self._head = (method, version, keep_alive)
        self._date = date
        self._pending = b""  # the head, sent with the first piece of body
        self._chunked = self._bodiless = False
        self._remaining: int | None = None  # declared body bytes not yet sent
        self.started = self.finished = False
        self.close = False  # the connection must close after this response
        self.overflow = False  # the app sent more than it declared

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.started:
            raise RuntimeError("http.response.start sent twice")
        method, version, keep_alive = self._head
        length = declared_length(headers)
        bodiless = method == "HEAD" or status in (204, 304) or status < 200
        self._chunked = length is None and not bodiless
        if self._chunked:
            if version == "1.0":  # no chunked framing in 1.0: delimit by close
                self._chunked = False
                self.close = True
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        if any(n.lower() == b"connection" and v.lower() == b"close" for n, v in headers):
            self.close = True  # the app asked for it
        elif not keep_alive or self.close:
            headers.append((b"connection", b"close"))
        self._pending = serialize_head(status, headers, None, self._date())
        self._bodiless = bodiless
        self._remaining = None if bodiless else length
        self.started = True

    def body(self, data: bytes, more: bool) -> bytes:
        if not self.started or self.finished:
            raise RuntimeError("http.response.body outside a response")
        out, self._pending = self._pending, b""
        if not more:
            self.finished = True
        if self._bodiless:
            return out
        if self._chunked:
            if data:
                out += b"%x\r\n%b\r\n" % (len(data), data)
            if not more:
                out += b"0\r\n\r\n"
            return out
        remaining = self._remaining
        if remaining is not None:
            if len(data) > remaining:  # never more than declared: drop the excess, then close
                data = data[:remaining]
                self.overflow = self.close = True
            self._remaining = remaining = remaining - len(data)
            if not more and remaining:
                self.close = True  # fewer than declared: only a close can tell the client
        return out + data if out else data
