"""The data plane against workers that misbehave on the wire, over real sockets.

Each worker here is a raw trio server written in the test (``RawWorker``): it reads one request
at a time and answers with whatever bytes the test scripts, or never answers. The gateway finds
it through a detection stub (it serves model "m"), so nothing but the proxied requests reaches
it. The clients are raw sockets read with h11 where a keep-alive connection's next answer
matters: a pooling client would quietly drop a connection with unread bytes and hide a desync.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial

import h11
import httpx
import pytest
import trio

from actors import open_gateway, worker_spec
from actors.registry.service import Gateway
from api.serve import serve_api
from scripts.fake_detector import InstantDetector
from tests.conftest import FAST, StartWorkers, register
from tests.raw_http import HOST, Handler, Peer, RawServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CHAT_BYTES = json.dumps(CHAT).encode()
MiB = 1024 * 1024


class Gw:
    """A gateway with the stub detector, its API served on port 0."""

    def __init__(self, gateway: Gateway, url: str) -> None:
        self.gateway = gateway
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])

    async def add(self, port: int) -> str:
        worker = await self.gateway.add_worker(worker_spec(f"{HOST}:{port}"))
        await self.gateway.wait_status(worker.id, "ready", 5)
        return worker.id


async def start_gateway(nursery: trio.Nursery, *, server: str = "http1", **config: object) -> Gw:
    gateway: Gateway = await nursery.start(_run_gateway, replace(FAST, **config))  # type: ignore[arg-type]
    [url] = await nursery.start(partial(serve_api, gateway, bind=f"{HOST}:0", server=server))
    return Gw(gateway, url)


async def _run_gateway(config: object, *, task_status: trio.TaskStatus[Gateway]) -> None:
    async with open_gateway(config, detector=InstantDetector()) as gateway:  # type: ignore[arg-type]
        task_status.started(gateway)
        await trio.sleep_forever()


class RawWorker(RawServer):
    """A worker whose every connection runs ``script``; ``closed`` is set each time the gateway
    closes one, ``requests`` holds every request head and body it read."""

    def __init__(self, script: Handler) -> None:
        super().__init__(script)
        self.requests: list[bytes] = []
        self.got_request = trio.Event()
        self.closed = trio.Event()

    async def handle(self, peer: Peer) -> None:
        try:
            await self.handler(peer)
            await peer.wait_closed()
        finally:
            self.closed.set()

    async def read(self, peer: Peer) -> bytes | None:
        request = await peer.request()
        if request is not None:
            self.requests.append(request)
            self.got_request.set()
        return request


class Client:
    """One keep-alive connection to the gateway, answers read with h11 in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream(HOST, port))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stream.aclose()

    async def send(self, method: bytes, target: bytes, body: bytes = b"") -> None:
        headers = [(b"host", b"gw"), (b"content-length", b"%d" % len(body))]
        if body:
            headers.append((b"content-type", b"application/json"))
        head = self.h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
        data = self.h11.send(h11.Data(data=body)) or b"" if body else b""
        await self.stream.send_all(head + data + (self.h11.send(h11.EndOfMessage()) or b""))

    async def answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next whole answer; its status, headers and body."""
        status, headers, body = 0, {}, b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some())
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.h11.start_next_cycle()
                return status, headers, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def post_chat(self) -> tuple[int, dict[bytes, bytes], bytes]:
        await self.send(b"POST", b"/v1/chat/completions", CHAT_BYTES)
        return await self.answer()


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything was logged at warning or above."""
    caplog.set_level(logging.INFO)
    yield
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


# ---- item 3: a worker cannot forge an answer on the client's connection ----------------------

FORGED = b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\nSMUGGLED-RESPONSE"


async def test_a_worker_framing_its_answer_two_ways_is_a_502_and_cannot_forge_the_next_answer(
    nursery: trio.Nursery, quiet: None
) -> None:
    async def smuggler(peer: Peer) -> None:
        if await worker.read(peer) is not None:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            await peer.stream.send_all(head + chunked(b"hello" + FORGED))

    worker = await RawWorker(smuggler).start(nursery)
    gw = await start_gateway(nursery)
    with trio.fail_after(10):
        await gw.add(worker.port)
        async with await Client.open(gw.port) as client:
            first = await client.post_chat()
            await client.send(b"GET", b"/health")
            second = await client.answer()
    assert second[2] == b"OK"  # the gateway's own answer, not the worker's forgery
    assert first[0] == 502
    assert json.loads(first[2])["error"]["code"] == "upstream_error"
    with trio.fail_after(10):
        await worker.closed.wait()  # the gateway closed its connection to the smuggler
    assert gw.gateway._dataplane._pool.idle_count(HOST, worker.port) == 0


# ---- item 7: large answers stream through; a short one cuts the client's connection ---------


async def test_a_large_sized_answer_reaches_the_client_before_the_worker_has_sent_it_all(
    nursery: trio.Nursery, quiet: None
) -> None:
    size = 4 * MiB
    client_has_head = trio.Event()

    async def large(peer: Peer) -> None:
        while await worker.read(peer) is not None:
            await peer.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            await peer.stream.send_all(b"a" * MiB)
            await client_has_head.wait()  # the rest only once the client has the answer's start
            await peer.stream.send_all(b"b" * (size - MiB))

    worker = await RawWorker(large).start(nursery)
    gw = await start_gateway(nursery)
    with trio.fail_after(10):
        await gw.add(worker.port)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            async with client.stream("POST", "/v1/chat/completions", json=CHAT) as answer:
                client_has_head.set()
                body = await answer.aread()
            again = await client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200
    assert answer.headers["content-length"] == str(size)
    assert body == b"a" * MiB + b"b" * (size - MiB)
    assert again.status_code == 200  # the worker's connection was pooled and reused
    assert len(again.content) == size


async def test_a_worker_answer_ending_short_of_its_length_cuts_the_clients_connection(
    nursery: trio.Nursery, quiet: None
) -> None:
    async def short(peer: Peer) -> None:
        if await worker.read(peer) is not None:
            await peer.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % MiB)
            await peer.stream.send_all(b"x" * (MiB // 4))
            await peer.stream.aclose()  # a quarter of the promised body, then gone

    worker = await RawWorker(short).start(nursery)
    gw = await start_gateway(nursery)
    with trio.fail_after(10):
        await gw.add(worker.port)
        stream = await trio.open_tcp_stream(HOST, gw.port)
        async with stream:
            client = Client(stream)
            await client.send(b"POST", b"/v1/chat/completions", CHAT_BYTES)
            received = b""
            while data := await stream.receive_some():  # until the gateway closes
                received += data
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as after:
            health = await after.get("/health")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: %d" % MiB in head.lower()
    assert 0 < len(body) < MiB  # never padded, never followed by anything else
    assert set(body) == {ord("x")}
    assert health.status_code == 200


# ---- item 8: the gateway out of descriptors is not the workers' failure -----------------------


def _emfile_plain(host: str, port: int) -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def _emfile_grouped(host: str, port: int) -> OSError:
    """The shape trio.open_tcp_stream raises: each address's error in an ExceptionGroup."""
    message = f"all attempts to connect to {host}:{port} failed"
    error = OSError(message)
    error.__cause__ = ExceptionGroup(message, [OSError(errno.EMFILE, "Too many open files")])
    return error


@pytest.mark.parametrize("shape", [_emfile_plain, _emfile_grouped])
async def test_running_out_of_file_descriptors_is_a_503_that_leaves_the_workers_breakers_closed(
    client: httpx.AsyncClient,
    gateway: Gateway,
    start_workers: StartWorkers,
    monkeypatch: pytest.MonkeyPatch,
    shape: Callable[[str, int], OSError],
) -> None:
    workers = await start_workers(2, model="m")
    ports = {w.port for w in workers}
    attempts: list[int] = []
    real = trio.open_tcp_stream

    async def out_of_descriptors(host: str, port: int, **kwargs: object) -> trio.SocketStream:
        if port not in ports:  # the test's own client connects through here too
            return await real(host, port, **kwargs)  # type: ignore[arg-type]
        attempts.append(port)
        raise shape(host, port)

    with trio.fail_after(20):
        await register(gateway, [w.port for w in workers])
        with monkeypatch.context() as patched:
            patched.setattr(trio, "open_tcp_stream", out_of_descriptors)
            answers = [
                await client.post("/v1/chat/completions", json=CHAT)
                for _ in range(gateway.config.breaker_failures + 2)
            ]
        after = await client.post("/v1/chat/completions", json=CHAT)
    assert {a.status_code for a in answers} == {503}
    assert {a.headers["retry-after"] for a in answers} == {"1"}
    assert {a.json()["error"]["code"] for a in answers} == {"gateway_overloaded"}
    assert len(attempts) == len(answers)  # one connect each: never retried on the other worker
    assert gateway._dataplane.breakers.states() == {}
    assert after.status_code == 200


# ---- item 9: upstream timeouts are settings; a client that leaves cancels its request --------


async def test_a_worker_that_never_answers_is_a_504_after_the_configured_read_timeout(
    nursery: trio.Nursery, quiet: None
) -> None:
    async def silent(peer: Peer) -> None:
        await worker.read(peer)

    worker = await RawWorker(silent).start(nursery)
    gw = await start_gateway(nursery, upstream_read_timeout_secs=0.2)
    with trio.fail_after(10):
        await gw.add(worker.port)
        async with await Client.open(gw.port) as client:
            began = trio.current_time()
            status, _, body = await client.post_chat()
            waited = trio.current_time() - began
        await worker.closed.wait()
    assert status == 504
    assert "0.2s" in json.loads(body)["error"]["message"]
    assert 0.2 <= waited < 5
    assert gw.gateway._dataplane._pool.limits.connect_timeout == FAST.upstream_connect_timeout_secs


@pytest.mark.parametrize("server", ["http1", "hypercorn"])
async def test_a_client_that_disconnects_before_a_plain_answer_cancels_the_upstream_request(
    nursery: trio.Nursery, quiet: None, server: str
) -> None:
    async def slow(peer: Peer) -> None:
        await worker.read(peer)  # and never answers: the request runs until cancelled

    worker = await RawWorker(slow).start(nursery)
    gw = await start_gateway(nursery, server=server)
    with trio.fail_after(10):
        worker_id = await gw.add(worker.port)
        client = await Client.open(gw.port)
        await client.send(b"POST", b"/v1/chat/completions", CHAT_BYTES)
        await worker.got_request.wait()
        assert gw.gateway.inflight.count(worker_id) == 1
        await client.stream.aclose()
        await worker.closed.wait()  # the gateway gave up the upstream request
        await gw.gateway.inflight.wait_idle(worker_id)
    assert gw.gateway._dataplane.breakers.states() == {}


# ---- item 11: the hop header ------------------------------------------------------------------


async def test_a_proxied_request_carries_the_hops_it_came_through_and_this_gateway(
    nursery: trio.Nursery, quiet: None
) -> None:
    async def echo(peer: Peer) -> None:
        while await worker.read(peer) is not None:
            await peer.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    worker = await RawWorker(echo).start(nursery)
    gw = await start_gateway(nursery)
    me = gw.gateway.config.instance_id
    with trio.fail_after(10):
        await gw.add(worker.port)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            plain = await client.post("/v1/chat/completions", json=CHAT)
            hopped = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"x-tmg-via": "aaaa, bbbb"}
            )
    assert (plain.status_code, hopped.status_code) == (200, 200)
    first, second = worker.requests
    assert f"\r\nx-tmg-via: {me}\r\n".encode() in first
    assert f"\r\nx-tmg-via: aaaa, bbbb, {me}\r\n".encode() in second
