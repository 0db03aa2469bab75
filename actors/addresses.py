"""Which worker addresses the gateway may probe and route to (pure).

Owned by the address-rules work: ``check_worker_address`` is called for every spec a caller
hands the gateway (POST, PUT, --worker-url, the library), before anything is probed.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from actors.errors import InvalidInput
from actors.urls import WorkerUrl

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=64)
def parse_networks(networks: tuple[str, ...]) -> tuple[Network, ...]:
    """The allowed networks of a config; InvalidInput naming the bad one."""
    parsed = []
    for text in networks:
        try:
            parsed.append(ipaddress.ip_network(text, strict=False))
        except (ValueError, TypeError):
            raise InvalidInput("allowed_networks", f"{text!r} is not a network (CIDR)") from None
    return tuple(parsed)


def check_worker_address(url: WorkerUrl, allowed_networks: tuple[str, ...] = ()) -> None:
    """Raise InvalidInput (field ``url``) when ``url`` may not be a worker's address."""
    parse_networks(allowed_networks)
