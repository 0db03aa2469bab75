"""The limits of api/http/server.py's server, and the open-file budget they are cut from.

Every resource a client can hold is bounded: head size, header count, body size, the time to send
a head or a body, the time a keep-alive connection may sit idle, the time one write may take (a
client that stops reading is dropped), and the number of connections.

**Connections and file descriptors.** At start the soft ``RLIMIT_NOFILE`` is raised to the hard
limit (the common soft default, 1,024, is far below what a gateway needs; raising it needs no
privilege). Client connections are capped below it, leaving room for the sockets to workers (one
per request in flight) and for files: by default half of what is left after a reserve of 64. When
the server is full, the oldest idle keep-alive connection is closed to admit the next client; if
none is idle, new connections wait in the kernel's listen backlog until one ends.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("tmg.http")
FD_RESERVE = 64  # descriptors kept for files, the listeners, logging, and the like
FD_CEILING = 1 << 20  # what we ask for when the hard limit is "unlimited"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = 32 * 1024 * 1024  # the app may refuse less (the management API: 1 MiB)
    head_timeout: float = 30.0  # from the first byte of a request to the end of its head
    body_timeout: float = 120.0  # from the end of the head to the end of the body
    keep_alive_timeout: float = 75.0  # an idle connection is closed after this long
    write_timeout: float = 30.0  # one write to a client that does not read: then it is dropped
    graceful_timeout: float = 5.0  # requests in progress get this long to finish on shutdown
    max_connections: int | None = None  # None: derived from the open-file limit

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (logged once); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.info("open-file limit stays at %d (raising it to %d: %s)", soft, target, error)
            return soft
        log.info("open-file limit raised from %d to %d", soft, target)
        return target
    return FD_CEILING if soft == resource.RLIM_INFINITY else soft


def connection_cap(limits: ServerLimits, open_files: int) -> int:
    """How many client connections to hold at once under ``open_files`` descriptors."""
    if limits.max_connections is not None:
        return limits.max_connections
    return max(16, (open_files - FD_RESERVE) // 2)
