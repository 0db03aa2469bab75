"""Worker URLs: parse, canonicalise, and derive the identity key (pure).

Accepted spellings: ``http://H:P``, ``https://H:P``, ``grpc://H:P``, ``grpcs://H:P`` and bare
``H:P``. The canonical form has a lower-case scheme and host, no trailing ``/`` and an explicit
port. Two spellings of one address share the identity key ``host:port``, so they are one worker.

Numeric hosts have one spelling each. An IPv4 address is four decimal numbers without leading
zeros (``127.0.0.1``); the other forms resolvers accept (``127.1``, ``2130706433``,
``0x7f000001``, ``0177.0.0.1``) are refused rather than given keys of their own. A host whose last
label is a number is taken as meant to be an IPv4 address, as browsers do. An IPv4-mapped IPv6
address (``[::ffff:127.0.0.1]``) is the IPv4 address it maps. IPv6 zone ids (``%eth0``) are
refused. Error messages never echo userinfo: a URL carrying ``@`` is shown as ``scheme://***@rest``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from actors.core.errors import InvalidUrl

MAX_URL_BYTES = 2048
SCHEMES = ("http", "https", "grpc", "grpcs")
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,62})?(\.[a-z0-9_]([a-z0-9_-]{0,62})?)*\.?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")  # what resolvers read as a number
_CANONICAL_IPV4 = "four decimal numbers 0-255 without leading zeros, like 127.0.0.1"


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
    shown = redact(raw)  # every message below names the URL this way, never with its userinfo
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        raise InvalidUrl(shown[:64] + "...", f"is longer than {MAX_URL_BYTES} bytes")
    if not raw.isascii():
        raise InvalidUrl(shown[:64], "must be ASCII (write an international host name in punycode)")
    if any(ch.isspace() for ch in raw) or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise InvalidUrl(shown, "must not contain whitespace or control characters")
    scheme: str | None = None
    rest = raw
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            named = "its scheme" if "@" in scheme else f"scheme {scheme!r}"
            raise InvalidUrl(shown, f"{named} is not one of {', '.join(SCHEMES)}")
    elif "/" in raw or "?" in raw or "#" in raw:
        raise InvalidUrl(shown, "a bare address is host:port with no path")
    if "@" in rest:  # before the other checks: a password may hold '/', '?' or '#'
        raise InvalidUrl(shown, "must not carry userinfo (user:password@)")
    for mark, what in (("?", "a query"), ("#", "a fragment")):
        if mark in rest:
            raise InvalidUrl(shown, f"must not carry {what}")
    netloc, slash, path = rest.partition("/")
    if slash and path:
        raise InvalidUrl(shown, "must not carry a path (only a single trailing '/' is allowed)")
    host, port = _split_host_port(shown, netloc, scheme)
    return WorkerUrl(scheme, host, port)


def redact(raw: str) -> str:
    """``raw`` fit for a message: everything before the last ``@`` (userinfo) becomes ``***``.

    The scheme is kept when it is a plain one; a URL without ``@`` is returned unchanged.
    """
    if "@" not in raw:
        return raw
    scheme, sep, _ = raw.partition("://")
    prefix = f"{scheme}://" if sep and scheme.lower() in SCHEMES else ""
    return f"{prefix}***@{raw.rpartition('@')[2]}"


def _check_numeric_host(shown: str, host: str) -> None:
    """A host whose last label is a number must be a canonical dotted-quad IPv4 address."""
    last = host.removesuffix(".").rpartition(".")[2]
    if not _NUMERIC_LABEL.match(last):
        return  # a host name
    try:
        canonical = str(ipaddress.IPv4Address(host))
    except ValueError:
        canonical = None  # leading zeros, hex, fewer than four parts, a trailing dot, ...
    if canonical != host:
        raise InvalidUrl(
            shown, f"{host!r} is not a canonical IPv4 address: write it as {_CANONICAL_IPV4}"
        )


def _split_host_port(shown: str, netloc: str, scheme: str | None) -> tuple[str, int]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise InvalidUrl(shown, "has an unclosed '[' in its IPv6 host")
        host_text, after = netloc[1:end], netloc[end + 1 :]
        if "%" in host_text:
            raise InvalidUrl(shown, "an IPv6 zone id ('%...') is not supported")
        try:
            address = ipaddress.IPv6Address(host_text.lower())
        except ValueError:
            raise InvalidUrl(shown, f"{host_text!r} is not an IPv6 address") from None
        mapped = address.ipv4_mapped  # [::ffff:127.0.0.1] is 127.0.0.1: one key for both
        host = str(mapped) if mapped is not None else address.compressed
        if after and not after.startswith(":"):
            raise InvalidUrl(shown, "has characters after the IPv6 host")
        port_text = after[1:] if after else None
    else:
        host_text, colon, port_part = netloc.rpartition(":")
        if not colon:
            host_text, port_part = netloc, ""
        if ":" in host_text:
            raise InvalidUrl(shown, "an IPv6 host must be written in brackets")
        host = host_text.lower()
        if not host:
            raise InvalidUrl(shown, "has an empty host")
        if not _HOSTNAME.match(host):
            raise InvalidUrl(shown, f"{host_text!r} is not a valid host name or IPv4 address")
        _check_numeric_host(shown, host)
        port_text = port_part if colon else None
    if port_text is None or port_text == "":
        if scheme in DEFAULT_PORTS:
            return host, DEFAULT_PORTS[scheme]
        raise InvalidUrl(
            shown, "must carry a port (grpc, grpcs and bare addresses have no default)"
        )
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise InvalidUrl(shown, f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidUrl(shown, f"port {port} is outside 1..65535")
    return host, port
