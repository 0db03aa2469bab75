"""Worker URLs: parse, canonicalise, and derive the identity key (pure).

Accepted spellings: ``http://H:P``, ``https://H:P``, ``grpc://H:P``, ``grpcs://H:P`` and bare
``H:P``. The canonical form has a lower-case scheme and host, no trailing ``/`` and an explicit
port. Two spellings of one address share the identity key ``host:port``, so they are one worker.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from actors.errors import InvalidUrl

MAX_URL_BYTES = 2048
SCHEMES = ("http", "https", "grpc", "grpcs")
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,62})?(\.[a-z0-9_]([a-z0-9_-]{0,62})?)*\.?$")


@dataclass(frozen=True, slots=True)
class WorkerUrl:
    """A canonical worker address. ``scheme`` is None for a bare ``host:port``."""

    scheme: str | None
    host: str  # lower-case; an IPv6 literal is kept without brackets
    port: int

    @property
    def key(self) -> str:
        """The identity key: ``host:port`` (IPv6 in brackets)."""
        return f"{self.netloc}"

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def text(self) -> str:
        return self.netloc if self.scheme is None else f"{self.scheme}://{self.netloc}"

    @property
    def is_grpc(self) -> bool:
        return self.scheme in ("grpc", "grpcs")

    @property
    def is_tls(self) -> bool:
        return self.scheme in ("https", "grpcs")

    def with_scheme(self, scheme: str) -> WorkerUrl:
        return WorkerUrl(scheme, self.host, self.port)

    def __str__(self) -> str:
        return self.text


def parse_worker_url(raw: str) -> WorkerUrl:
    """Parse one URL spelling into its canonical form, or raise InvalidUrl saying why."""
    if not isinstance(raw, str):
        raise InvalidUrl(repr(raw), "must be a string")
    if raw == "":
        raise InvalidUrl(raw, "must not be empty")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        raise InvalidUrl(raw[:64] + "...", f"is longer than {MAX_URL_BYTES} bytes")
    if not raw.isascii():
        raise InvalidUrl(raw[:64], "must be ASCII (write an international host name in punycode)")
    if any(ch.isspace() for ch in raw) or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise InvalidUrl(raw, "must not contain whitespace or control characters")
    scheme: str | None = None
    rest = raw
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise InvalidUrl(raw, f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    elif "/" in raw or "?" in raw or "#" in raw:
        raise InvalidUrl(raw, "a bare address is host:port with no path")
    for mark, what in (("?", "a query"), ("#", "a fragment")):
        if mark in rest:
            raise InvalidUrl(raw, f"must not carry {what}")
    netloc, slash, path = rest.partition("/")
    if slash and path:
        raise InvalidUrl(raw, "must not carry a path (only a single trailing '/' is allowed)")
    if "@" in netloc:
        raise InvalidUrl(raw, "must not carry userinfo (user:password@)")
    host, port = _split_host_port(raw, netloc, scheme)
    return WorkerUrl(scheme, host, port)


def _split_host_port(raw: str, netloc: str, scheme: str | None) -> tuple[str, int]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise InvalidUrl(raw, "has an unclosed '[' in its IPv6 host")
        host_text, after = netloc[1:end], netloc[end + 1 :]
        try:
            host = ipaddress.IPv6Address(host_text.lower()).compressed
        except ValueError:
            raise InvalidUrl(raw, f"{host_text!r} is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise InvalidUrl(raw, "has characters after the IPv6 host")
        port_text = after[1:] if after else None
    else:
        host_text, colon, port_part = netloc.rpartition(":")
        if not colon:
            host_text, port_part = netloc, ""
        if ":" in host_text:
            raise InvalidUrl(raw, "an IPv6 host must be written in brackets")
        host = host_text.lower()
        if not host:
            raise InvalidUrl(raw, "has an empty host")
        if not _HOSTNAME.match(host):
            raise InvalidUrl(raw, f"{host_text!r} is not a valid host name or IPv4 address")
        port_text = port_part if colon else None
    if port_text is None or port_text == "":
        if scheme in DEFAULT_PORTS:
            return host, DEFAULT_PORTS[scheme]
        raise InvalidUrl(raw, "must carry a port (grpc, grpcs and bare addresses have no default)")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise InvalidUrl(raw, f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidUrl(raw, f"port {port} is outside 1..65535")
    return host, port
