"""The address rules (actors/core/addresses.py): which worker addresses the gateway refuses to
probe.

The rule is a pure function of the URL and the allowed networks, tested directly. The one test
through the HTTP API posts only addresses whose packets cannot leave this host (multicast,
broadcast, unspecified, a link-local IPv6 address without a zone): even a gateway without the
rules could not reach anything with them.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from actors import worker_spec
from actors.core.addresses import METADATA_NAMES, check_worker_address, parse_networks
from actors.core.errors import InvalidInput
from actors.core.urls import parse_worker_url
from actors.registry.service import Gateway

ALLOW_EVERYTHING = ("0.0.0.0/0", "::/0")


def refusal(raw: str, allowed: tuple[str, ...] = ()) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        check_worker_address(parse_worker_url(raw), allowed)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("0.0.0.0:8000", "unspecified"),
        ("http://0.1.2.3:8000", "unspecified"),  # 0.0.0.0/8, "this network"
        ("[::]:8000", "unspecified"),
        ("224.0.0.1:8000", "multicast"),
        ("grpc://239.255.255.250:1900", "multicast"),
        ("[ff02::1]:8000", "multicast"),
        ("[ff05::1:3]:547", "multicast"),
        ("255.255.255.255:8000", "broadcast"),
        ("[64:ff9b::224.0.0.1]:80", "multicast"),  # NAT64 would carry it to the IPv4 address
    ],
)
def test_an_address_that_is_never_a_tcp_server_is_refused_even_when_every_network_is_allowed(
    raw: str, kind: str
) -> None:
    for allowed in ((), ALLOW_EVERYTHING):
        error = refusal(raw, allowed)

        assert error.field == "url" and error.status == 400 and error.code == "BAD_REQUEST"
        assert kind in error.message
        assert "can never be a worker" in error.message


@pytest.mark.parametrize(
    ("raw", "kind", "network"),
    [
        ("169.254.169.254:80", "link-local", "169.254.169.254/32"),  # AWS, GCP, Azure, OCI, ...
        ("http://169.254.170.2:80", "link-local", "169.254.170.0/24"),  # AWS ECS task metadata
        ("169.254.0.1:8000", "link-local", "169.254.0.0/16"),
        ("[fe80::1]:8000", "link-local", "fe80::/10"),
        ("[febf::1]:8000", "link-local", "fe80::/10"),
        ("[fd00:ec2::254]:80", "metadata", "fd00:ec2::/64"),  # AWS over IPv6
        ("[fd20:ce::254]:80", "metadata", "fd20:ce::254/128"),  # GCP over IPv6
        ("100.100.100.200:80", "metadata", "100.100.100.0/24"),  # Alibaba Cloud
        ("240.0.0.1:8000", "reserved", "240.0.0.0/4"),
        ("[::ffff:169.254.169.254]:80", "link-local", "169.254.0.0/16"),  # mapped: IPv4
        ("[64:ff9b::169.254.169.254]:80", "link-local", "169.254.0.0/16"),  # NAT64
        ("[64:ff9b::169.254.169.254]:80", "link-local", "64:ff9b::/96"),
        ("[::169.254.169.254]:80", "link-local", "169.254.0.0/16"),  # IPv4-compatible
    ],
)
def test_a_link_local_or_metadata_address_is_refused_unless_an_allowed_network_holds_it(
    raw: str, kind: str, network: str
) -> None:
    error = refusal(raw)

    assert error.field == "url" and error.status == 400
    assert kind in error.message
    assert "GatewayConfig.allowed_networks" in error.message
    assert "--allow-network" in error.message
    check_worker_address(parse_worker_url(raw), (network,))  # allowed: no error
    check_worker_address(parse_worker_url(raw), ("10.0.0.0/8", network))


@pytest.mark.parametrize(
    ("raw", "network"),
    [
        ("169.254.169.254:80", "169.254.10.0/24"),  # a neighbour, not the metadata address
        ("169.254.169.254:80", "fe80::/10"),  # another family
        ("[fe80::1]:80", "169.254.0.0/16"),
        ("[fe80::1]:80", "fe80::2/128"),
    ],
)
def test_an_allowed_network_that_does_not_hold_the_address_allows_nothing(
    raw: str, network: str
) -> None:
    assert "link-local" in refusal(raw, (network,)).message


@pytest.mark.parametrize("name", sorted(METADATA_NAMES))
def test_the_names_of_cloud_metadata_services_are_refused_whatever_networks_are_allowed(
    name: str,
) -> None:
    for raw in (f"{name}:80", f"http://{name.upper()}:80/", f"https://{name}.", f"{name}.:8080"):
        error = refusal(raw, ALLOW_EVERYTHING)

        assert error.field == "url"
        assert "metadata" in error.message


def test_the_metadata_names_include_gcp_and_aws() -> None:
    assert {"metadata.google.internal", "metadata.goog", "instance-data"} <= METADATA_NAMES


@pytest.mark.parametrize(
    "raw",
    [
        "127.0.0.1:8000",
        "127.0.0.2:8000",
        "[::1]:8000",
        "localhost:8000",
        "http://10.0.0.7:8000",
        "172.16.0.1:8000",
        "192.168.1.20:8000",
        "100.64.0.1:8000",  # carrier-grade NAT, but not Alibaba's metadata address
        "8.8.8.8:443",
        "[2001:db8::1]:8000",
        "[fd00::1]:8000",
        "worker-3.inference.svc.cluster.local:8000",
        "metadata.example.com:8000",  # a name that only contains "metadata"
        "my-metadata:8000",
        "169.254.example:8000",
        "grpc://worker.example:50051",
    ],
)
def test_ordinary_worker_addresses_are_accepted(raw: str) -> None:
    check_worker_address(parse_worker_url(raw))


def test_the_check_never_resolves_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> object:
        raise AssertionError("the address check resolved a name")

    for function in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, function, no_dns)

    check_worker_address(parse_worker_url("worker.example:8000"))
    check_worker_address(parse_worker_url("localhost:8000"), ("169.254.0.0/16",))
    assert "metadata" in refusal("metadata.google.internal:80").message


@pytest.mark.parametrize("raw", ["127.1:8000", "2130706433:8000", "0x7f000001:8000"])
def test_loopback_aliases_are_refused_before_the_rule_so_none_gets_a_key_of_its_own(
    raw: str,
) -> None:
    with pytest.raises(InvalidInput, match="canonical IPv4"):
        parse_worker_url(raw)
    assert parse_worker_url("[::ffff:127.0.0.1]:8000").key == "127.0.0.1:8000"


@pytest.mark.parametrize("bad", ["169.254.0.0/33", "not-a-network", "fe80::/129", ""])
def test_an_allowed_network_that_is_not_a_cidr_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_networks(("10.0.0.0/8", bad))

    assert caught.value.field == "allowed_networks"
    assert repr(bad) in caught.value.message


# ---- through the gateway (nothing probed leaves the host) -----------------------------------

NEVER_LEAVES_THE_HOST = [
    "224.0.0.1:8000",
    "http://239.255.255.250:1900",
    "255.255.255.255:8000",
    "0.0.0.0:9",
    "[::]:9",
    "[fe80::1]:8000",  # link-local without a zone: the kernel cannot even pick an interface
    "[ff02::1]:8000",
]


@pytest.mark.parametrize("raw", NEVER_LEAVES_THE_HOST)
async def test_post_workers_with_a_refused_address_is_a_400_on_url_and_registers_nothing(
    raw: str, client: httpx.AsyncClient, gateway: Gateway
) -> None:
    answer = await client.post("/workers", json={"url": raw, "max_connection_attempts": 1})

    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["field"] == "url" and body["code"] == "BAD_REQUEST"
    assert "never be a worker" in body["error"] or "--allow-network" in body["error"]
    assert gateway.list_workers() == []
    assert (await client.get("/workers")).json()["total"] == 0


@pytest.mark.parametrize("raw", NEVER_LEAVES_THE_HOST)
async def test_a_library_caller_adding_a_refused_address_gets_invalid_input(
    raw: str, gateway: Gateway
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await gateway.add_worker(worker_spec(raw, max_connection_attempts=1))

    assert caught.value.field == "url"
    assert gateway.list_workers() == []
