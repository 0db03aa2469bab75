"""Worker URLs: canonical form, identity key, and every rejection (API.md section 1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.core.errors import InvalidInput, InvalidUrl
from actors.core.urls import MAX_URL_BYTES, WorkerUrl, parse_worker_url


@pytest.mark.parametrize(
    ("raw", "scheme", "host", "port", "text", "key"),
    [
        ("HTTP://A:1/", "http", "a", 1, "http://a:1", "a:1"),
        ("http://a:1", "http", "a", 1, "http://a:1", "a:1"),
        ("a:1", None, "a", 1, "a:1", "a:1"),
        ("grpc://a:1", "grpc", "a", 1, "grpc://a:1", "a:1"),
        (
            "GRPCS://Worker.Example:50051/",
            "grpcs",
            "worker.example",
            50051,
            "grpcs://worker.example:50051",
            "worker.example:50051",
        ),
        ("https://x", "https", "x", 443, "https://x:443", "x:443"),
        ("https://x/", "https", "x", 443, "https://x:443", "x:443"),
        ("http://x", "http", "x", 80, "http://x:80", "x:80"),
        ("http://10.0.0.7:8000", "http", "10.0.0.7", 8000, "http://10.0.0.7:8000", "10.0.0.7:8000"),
        ("http://[::1]:8000", "http", "::1", 8000, "http://[::1]:8000", "[::1]:8000"),
        ("[0:0::1]:8000", None, "::1", 8000, "[::1]:8000", "[::1]:8000"),
        ("http://[FE80::A]", "http", "fe80::a", 80, "http://[fe80::a]:80", "[fe80::a]:80"),
        ("http://a:65535", "http", "a", 65535, "http://a:65535", "a:65535"),
    ],
)
def test_each_accepted_spelling_has_one_canonical_form(
    raw: str, scheme: str | None, host: str, port: int, text: str, key: str
) -> None:
    url = parse_worker_url(raw)

    assert (url.scheme, url.host, url.port) == (scheme, host, port)
    assert url.text == text
    assert str(url) == text
    assert url.key == key


@pytest.mark.parametrize(
    "spellings",
    [
        ["HTTP://A:1/", "http://a:1", "a:1", "grpc://a:1", "https://a:1", "GRPCS://a:1/"],
        ["http://[::1]:8000", "[0:0::1]:8000", "grpc://[0000::1]:8000/", "[::1]:8000"],
        ["http://x", "http://x:80", "HTTP://X:80/", "x:80", "grpc://x:80"],
        ["https://x", "x:443", "https://X:443/"],
        ["127.0.0.1:8000", "[::ffff:127.0.0.1]:8000", "http://[::FFFF:7F00:1]:8000/"],
    ],
)
def test_all_spellings_of_one_address_share_an_identity_key(spellings: list[str]) -> None:
    keys = {parse_worker_url(raw).key for raw in spellings}

    assert len(keys) == 1


def test_different_ports_or_hosts_are_different_addresses() -> None:
    keys = {parse_worker_url(raw).key for raw in ["a:1", "a:2", "b:1", "http://x", "https://x"]}

    assert len(keys) == 5


def test_scheme_flags_say_grpc_and_tls() -> None:
    flags = {
        raw: (parse_worker_url(raw).is_grpc, parse_worker_url(raw).is_tls)
        for raw in ["http://a:1", "https://a:1", "grpc://a:1", "grpcs://a:1", "a:1"]
    }

    assert flags == {
        "http://a:1": (False, False),
        "https://a:1": (False, True),
        "grpc://a:1": (True, False),
        "grpcs://a:1": (True, True),
        "a:1": (False, False),
    }


def test_with_scheme_keeps_the_address_and_its_key() -> None:
    bare = parse_worker_url("A:1")

    chosen = bare.with_scheme("grpc")

    assert chosen == WorkerUrl("grpc", "a", 1)
    assert chosen.text == "grpc://a:1"
    assert chosen.key == bare.key


def test_a_url_of_exactly_the_byte_limit_is_accepted() -> None:
    host = ".".join(["a" * 63] * 31)  # 1983 characters of valid 63-character labels
    host += "." + "b" * (MAX_URL_BYTES - len("http://" + host + ".:1"))
    raw = f"http://{host}:1"
    assert len(raw.encode()) == MAX_URL_BYTES

    assert parse_worker_url(raw).port == 1


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ("", "empty"),
        ("ftp://a:1", "scheme"),
        ("ws://a:1", "scheme"),
        ("http://u:p@a:1", "userinfo"),
        ("http://u@a:1", "userinfo"),
        ("http://a:1/v1", "path"),
        ("http://a:1//", "path"),
        ("a:1/v1", "path"),
        ("http://a:1?x=1", "query"),
        ("http://a:1/?x=1", "query"),
        ("http://a:1#top", "fragment"),
        ("http://a:0", "outside 1..65535"),
        ("http://a:65536", "outside 1..65535"),
        ("a:99999", "outside 1..65535"),
        ("http://a:http", "not a number"),
        ("http://a:-1", "not a number"),
        ("http://a:+1", "not a number"),
        ("http://a:1 ", "whitespace"),
        (" a:1", "whitespace"),
        ("http://a :1", "whitespace"),
        ("http://a:1\n", "whitespace"),
        ("http://a\t:1", "whitespace"),
        ("http://a\x00:1", "control"),
        ("a", "port"),
        ("grpc://a", "port"),
        ("grpcs://a/", "port"),
        ("[::1]", "port"),
        ("http://", "empty host"),
        ("http://:80", "empty host"),
        (":80", "empty host"),
        ("::1:80", "brackets"),
        ("http://::1:80", "brackets"),
        ("http://[::1", "unclosed"),
        ("http://[not-ipv6]:1", "not an IPv6 address"),
        ("http://[::1]x:1", "after the IPv6 host"),
        ("http://a_b!c:1", "not a valid host"),
        ("http://a..b:1", "not a valid host"),
        ("http://" + "a" * 64 + ":1", "not a valid host"),
    ],
)
def test_a_malformed_url_is_a_400_naming_the_problem(raw: str, named: str) -> None:
    with pytest.raises(InvalidUrl) as caught:
        parse_worker_url(raw)

    error = caught.value
    assert isinstance(error, InvalidInput)
    assert error.status == 400
    assert error.code == "BAD_REQUEST"
    assert error.field == "url"
    assert named in error.message
    assert error.message.startswith("url: ")


def test_a_url_over_2048_bytes_is_a_400_that_does_not_echo_the_whole_url() -> None:
    raw = "http://" + "a" * MAX_URL_BYTES + ":1"

    with pytest.raises(InvalidUrl) as caught:
        parse_worker_url(raw)

    assert str(MAX_URL_BYTES) in caught.value.message
    assert "bytes" in caught.value.message
    assert len(caught.value.message) < 200


def test_a_url_over_2048_bytes_because_of_multibyte_characters_is_refused() -> None:
    raw = "http://" + "é" * 1100 + ":1"  # 1100 characters, 2200 bytes
    assert len(raw) < MAX_URL_BYTES < len(raw.encode())

    with pytest.raises(InvalidUrl, match="longer than 2048 bytes"):
        parse_worker_url(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "http://a:\u00b2",  # '²' passes str.isdigit() but not int()
        "http://a:\uff18\uff10",  # full-width '80'
        "http://b\u00fccher.example:1",  # an international name not in punycode
        "\u0430:1",  # a Cyrillic look-alike of 'a'
    ],
    ids=["superscript-port", "fullwidth-port", "umlaut-host", "cyrillic-host"],
)
def test_a_url_with_non_ascii_characters_is_a_400(raw: str) -> None:
    with pytest.raises(InvalidUrl, match="ASCII") as caught:
        parse_worker_url(raw)

    assert caught.value.status == 400


@pytest.mark.parametrize("raw", ["http://a\ud800:1", "\udfff", "a:1\udc80"])
def test_a_url_with_a_lone_surrogate_is_a_400_whose_message_can_be_sent(raw: str) -> None:
    with pytest.raises(InvalidUrl) as caught:  # json.loads('"\\ud800"') makes such strings
        parse_worker_url(raw)

    assert caught.value.status == 400
    caught.value.message.encode("utf-8")  # the error body can be encoded


def test_a_value_that_is_not_a_string_is_a_400() -> None:
    with pytest.raises(InvalidUrl, match="must be a string"):
        parse_worker_url(8000)  # type: ignore[arg-type]


# ---- numeric hosts have one spelling each ------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.1",  # fewer than four parts
        "127.0.1",
        "2130706433",  # a single integer
        "0x7f000001",  # hex
        "0x7f.0.0.1",
        "0177.0.0.1",  # octal (a leading zero)
        "127.0.0.01",
        "127.000.0.1",
        "127.0.0.1.",  # a trailing dot
        "1.2.3.0x4",
        "256.0.0.1",  # out of range
        "1.2.3.4.5",
        "worker.example.42",  # a number as the last label is read as IPv4 by resolvers
        "x.0x",
    ],
)
def test_a_non_canonical_numeric_ipv4_host_is_refused_saying_how_to_write_it(host: str) -> None:
    for raw in (f"{host}:8000", f"http://{host}:8000/", f"GRPC://{host.upper()}:8000"):
        with pytest.raises(InvalidUrl) as caught:
            parse_worker_url(raw)

        assert "not a canonical IPv4 address" in caught.value.message
        assert "127.0.0.1" in caught.value.message  # the example of the canonical form
        assert caught.value.field == "url"


@pytest.mark.parametrize(
    "host", ["1.example", "0x1.example", "127.example", "a1b.c", "x0x7f", "1e5.h", "0.0.0.0"]
)
def test_a_name_whose_last_label_is_not_a_number_stays_a_name(host: str) -> None:
    assert parse_worker_url(f"{host}:1").host == host


@pytest.mark.parametrize(
    ("raw", "text", "key"),
    [
        ("[::ffff:127.0.0.1]:8000", "127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://[::ffff:7f00:1]:8000", "http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("grpc://[0:0:0:0:0:FFFF:10.1.2.3]:9", "grpc://10.1.2.3:9", "10.1.2.3:9"),
    ],
)
def test_an_ipv4_mapped_ipv6_address_is_the_ipv4_address(raw: str, text: str, key: str) -> None:
    url = parse_worker_url(raw)

    assert (url.text, url.key) == (text, key)
    assert ":" not in url.host


def test_the_ipv6_neighbours_of_mapped_addresses_stay_ipv6() -> None:
    assert parse_worker_url("[::7f00:1]:1").key == "[::7f00:1]:1"  # IPv4-compatible, not mapped
    assert parse_worker_url("[64:ff9b::7f00:1]:1").key == "[64:ff9b::7f00:1]:1"  # NAT64


@pytest.mark.parametrize("raw", ["[fe80::1%eth0]:80", "http://[fe80::1%25eth0]:80", "[::1%1]:1"])
def test_an_ipv6_zone_id_is_refused(raw: str) -> None:
    with pytest.raises(InvalidUrl, match="zone id"):
        parse_worker_url(raw)


# ---- userinfo is never echoed -------------------------------------------------------------

SECRET = "Pa55w0rd-xyzzy"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (f"http://user:{SECRET}@a:1", "'http://***@a:1'"),
        (f"http://user:{SECRET}@a:1/v1", "'http://***@a:1/v1'"),  # would be a path error
        (f"http://user:{SECRET}@a:1?x=1", "'http://***@a:1?x=1'"),
        (f"ftp://user:{SECRET}@a:1", "'***@a:1'"),  # a bad scheme too
        (f"http://user:{SECRET}/x@a:1", "'http://***@a:1'"),  # a '/' in the password
        (f"http://user:{SECRET}#@a:1", "'http://***@a:1'"),
        (f"http://user:{SECRET}?@a:1", "'http://***@a:1'"),
        (f"http://user:{SECRET}@@a:1", "'http://***@a:1'"),
        (f"user:{SECRET}@a:1", "'***@a:1'"),  # bare
        (f"user:{SECRET}/x@a:1", "'***@a:1'"),
        (f"http://u:{SECRET} x@a:1", "'http://***@a:1'"),  # whitespace
        (f"http://u:{SECRET}\u00e9@a:1", "'http://***@a:1'"),  # not ASCII
        (f"http://{SECRET}@", "'http://***@'"),
        (f"{SECRET}://x@a:1", "'***@a:1'"),
        (f"http://u:{SECRET}@" + "a" * MAX_URL_BYTES + ":1", "'http://***@aaaa"),  # too long
    ],
)
def test_a_url_with_userinfo_is_refused_without_echoing_it(raw: str, shown: str) -> None:
    with pytest.raises(InvalidUrl) as caught:
        parse_worker_url(raw)

    message = caught.value.message
    assert SECRET not in message
    assert shown in message
    assert caught.value.field == "url"


_URL_CHARACTERS = st.sampled_from([*"ab1:/?#@[]% .\t\u00e9", "%40", "://", "http"])


@settings(max_examples=500, deadline=None, database=None)
@given(
    st.sampled_from(["", "http://", "HTTPS://", "grpc://", "ftp://", "x"]),
    st.lists(_URL_CHARACTERS, max_size=8).map("".join),
    st.lists(_URL_CHARACTERS, max_size=8).map("".join),
)
def test_no_refusal_of_a_url_with_an_at_sign_shows_what_precedes_it(
    scheme: str, before: str, after: str
) -> None:
    raw = f"{scheme}{before}{SECRET}{before}@{after}"
    try:
        parse_worker_url(raw)
    except InvalidUrl as error:
        assert SECRET not in error.message
        assert raw not in error.message
    else:
        raise AssertionError(f"{raw!r} was accepted")


# ---- property: the canonical form is a fixed point -------------------------------------------

_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_LAST_LABEL = _LABEL.map(lambda label: "h" + label)  # a numeric last label means IPv4
_HOSTNAMES = st.tuples(st.lists(_LABEL, max_size=3), _LAST_LABEL).map(
    lambda parts: ".".join([*parts[0], parts[1]])
)
_IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda parts: ".".join(map(str, parts)))
_IPV6 = st.ip_addresses(v=6).map(lambda address: f"[{address.exploded}]")


@st.composite
def _spellings(draw: st.DrawFn) -> str:
    """One random accepted spelling: case changes, optional default port and trailing '/'."""
    host = draw(st.one_of(_HOSTNAMES, _IPV4, _IPV6))
    host = "".join(ch.upper() if draw(st.booleans()) else ch for ch in host)
    scheme = draw(st.sampled_from([None, "http", "https", "grpc", "grpcs"]))
    port: int | None = draw(st.integers(1, 65535))
    if scheme in ("http", "https") and draw(st.booleans()):
        port = None  # the default port is made explicit
    netloc = host if port is None else f"{host}:{port}"
    if scheme is None:
        return netloc
    scheme = "".join(ch.upper() if draw(st.booleans()) else ch for ch in scheme)
    slash = "/" if draw(st.booleans()) else ""
    return f"{scheme}://{netloc}{slash}"


@settings(max_examples=300, deadline=None, database=None)
@given(_spellings())
def test_the_canonical_text_parses_back_to_the_same_url_and_key(raw: str) -> None:
    url = parse_worker_url(raw)

    again = parse_worker_url(url.text)

    assert again == url
    assert again.text == url.text
    assert again.key == url.key
    assert url.text == url.text.lower()
    assert not url.text.endswith("/")
    assert 1 <= url.port <= 65535
    assert parse_worker_url(url.key).key == url.key  # the key is itself a valid bare spelling


@settings(max_examples=300, deadline=None, database=None)
@given(_spellings(), st.sampled_from(["http", "grpc", "https", "grpcs"]))
def test_another_scheme_for_the_same_host_and_port_keeps_the_key(raw: str, scheme: str) -> None:
    url = parse_worker_url(raw)

    other = parse_worker_url(f"{scheme.upper()}://{url.netloc}/")

    assert other.key == url.key
    assert other.scheme == scheme
