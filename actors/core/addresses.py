"""Which worker addresses the gateway may probe and route to (pure: no I/O, no DNS).

``check_worker_address`` is called for every spec a caller hands the gateway (POST, PUT,
``--worker-url``, the library) before anything is probed. The rules, on the address as written:

* **Never a worker**, whatever ``allowed_networks`` says, because no TCP server can be reached
  there: the unspecified addresses (``0.0.0.0/8`` "this network", ``::``), multicast
  (``224.0.0.0/4``, ``ff00::/8``) and the limited broadcast ``255.255.255.255``.
* **Refused unless inside an allowed network** (``GatewayConfig.allowed_networks``, ``tmg serve
  --allow-network CIDR``): link-local addresses (``169.254.0.0/16``, ``fe80::/10``), where cloud
  metadata services live (``169.254.169.254``, ECS's ``169.254.170.2``), the metadata addresses
  outside link-local (AWS ``fd00:ec2::254``, GCP ``fd20:ce::254``, Alibaba ``100.100.100.200``)
  and the reserved ``240.0.0.0/4``.
* **Refused names**: the well-known names of cloud metadata services (``METADATA_NAMES``: GCP
  ``metadata.google.internal``, ``metadata.goog`` and ``metadata``; AWS ``instance-data`` and
  ``instance-data.ec2.internal``), with or without a trailing dot. A name is never resolved here,
  so a network setting cannot allow one: give such a worker by address.
* An IPv6 address embedding an IPv4 one (NAT64 ``64:ff9b::/96``, the deprecated IPv4-compatible
  ``::a.b.c.d``, and IPv4-mapped ``::ffff:a.b.c.d``, which ``actors.core.urls`` turns into IPv4
  already) is judged as that IPv4 address too.

Every other address (loopback, private networks, public addresses, other names) is accepted.
The check reads only the URL: a DNS name that resolves to a refused address is not caught.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from actors.core.errors import InvalidInput
from actors.core.urls import WorkerUrl

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_SETTING = "GatewayConfig.allowed_networks / tmg serve --allow-network CIDR"
METADATA_NAMES = frozenset(
    {
        "metadata.google.internal",  # GCP
        "metadata.goog",  # GCP
        "metadata",  # GCP's short name, resolved through the google.internal search domain
        "instance-data",  # AWS EC2 (resolved through the ec2.internal search domain)
        "instance-data.ec2.internal",  # AWS EC2
    }
)
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text)
    for text in ("fd00:ec2::254", "fd20:ce::254", "100.100.100.200")  # AWS, GCP, Alibaba
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_RESERVED = ipaddress.IPv4Network("240.0.0.0/4")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


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
    networks = parse_networks(allowed_networks)
    try:
        address: Address = ipaddress.ip_address(url.host)
    except ValueError:
        _check_name(url)
        return
    for judged in _judged_forms(address):
        what = url.text if judged is address else f"{url.text} (which carries {judged})"
        never = _never_a_worker(judged)
        if never is not None:
            raise InvalidInput("url", f"{what} is {never}: it can never be a worker")
        refused = _refused_by_default(judged)
        allowed = any(_inside(form, net) for form in (address, judged) for net in networks)
        if refused is not None and not allowed:
            raise InvalidInput(
                "url",
                f"{what} is {refused}, which is refused as a worker address; to allow it, "
                f"name a network that holds it in {ALLOW_SETTING}",
            )


def _check_name(url: WorkerUrl) -> None:
    name = url.host.removesuffix(".")
    if name in METADATA_NAMES:
        raise InvalidInput(
            "url",
            f"{url.text} names a cloud metadata service, which is never a worker; if a worker "
            f"really is there, give its address and allow it in {ALLOW_SETTING}",
        )


def _judged_forms(address: Address) -> list[Address]:
    """The address, and the IPv4 address an IPv6 one carries (mapped, NAT64, IPv4-compatible)."""
    forms: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and (
        address.ipv4_mapped is not None
        or address in _NAT64
        or (address in _IPV4_COMPATIBLE and int(address) > 1)
    ):
        forms.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return forms


def _never_a_worker(address: Address) -> str | None:
    if address.is_unspecified or address in _THIS_NETWORK:
        return "an unspecified address (use 127.0.0.1 or ::1 for this host)"
    if address.is_multicast:
        return "a multicast address"
    if address == _BROADCAST:
        return "the broadcast address"
    return None


def _refused_by_default(address: Address) -> str | None:
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if isinstance(address, ipaddress.IPv4Address) and address in _RESERVED:
        return "a reserved address (240.0.0.0/4)"
    return None


def _inside(address: Address, network: Network) -> bool:
    return address.version == network.version and address in network
