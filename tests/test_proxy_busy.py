"""Busy is not broken: workers answering 429 or 503 are overloaded, not failing (real sockets).

A busy worker here is a raw server (``RawWorker``) that answers every request with the status
and Retry-After the test gives it, on a kept-alive connection; the free one is a fake worker.
The gateway finds them all through the stub detector (model "m").
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Iterator

import httpx
import pytest
import trio

from actors.dataplane.client import WorkersBusy, request
from actors.dataplane.proxy import MAX_RETRY_AFTER, _retry_after
from tests.conftest import StartWorkers
from tests.raw_http import Peer
from tests.test_metrics import samples
from tests.test_proxy_wire import CHAT, RawWorker, start_gateway


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything was logged at warning or above."""
    caplog.set_level(logging.INFO)
    yield
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


def busy_worker(status: int, retry_after: bytes | None = None) -> RawWorker:
    """A worker that answers every request ``status`` (with Retry-After, if given)."""
    body = json.dumps({"error": {"message": "server is overloaded"}}).encode()
    head = b"HTTP/1.1 %d Busy\r\ncontent-type: application/json\r\n" % status
    if retry_after is not None:
        head += b"retry-after: %b\r\n" % retry_after
    answer = head + b"content-length: %d\r\n\r\n%b" % (len(body), body)

    async def script(peer: Peer) -> None:
        while await worker.read(peer) is not None:
            await peer.send(answer)

    worker = RawWorker(script)
    return worker


def broken_worker() -> RawWorker:
    async def script(peer: Peer) -> None:
        while await worker.read(peer) is not None:
            await peer.send(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")

    worker = RawWorker(script)
    return worker


async def test_a_busy_worker_opens_no_breaker_and_costs_the_client_no_5xx_while_another_is_free(
    nursery: trio.Nursery, start_workers: StartWorkers, quiet: None
) -> None:
    busy = await busy_worker(503, b"3").start(nursery)
    [free] = await start_workers(1, model="m")
    gw = await start_gateway(nursery, policy="round_robin")
    count = 4 * gw.gateway.config.breaker_failures
    with trio.fail_after(20):
        busy_id = await gw.add(busy.port)
        free_id = await gw.add(free.port)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(count)]
            metrics = samples((await client.get("/metrics")).text)
    assert [a.status_code for a in answers] == [200] * count
    assert {a.headers["x-worker-id"] for a in answers} == {free_id}
    tried = len(busy.requests)
    assert tried > gw.gateway.config.breaker_failures  # a failure count would have opened it
    assert gw.gateway._dataplane.breakers.states() == {}
    assert busy.accepted == 1  # each busy answer was read out: one kept-alive connection
    assert metrics[("tmg_worker_busy_total", (("worker_id", busy_id),))] == tried
    assert ("tmg_worker_busy_total", (("worker_id", free_id),)) not in metrics
    assert metrics[("tmg_retries_total", (("model", "m"),))] == tried
    code = (("code", "503"), ("model", "m"), ("worker_id", busy_id))
    assert metrics[("tmg_requests_total", code)] == tried


async def test_when_every_worker_answers_429_the_client_gets_429_with_their_retry_after(
    nursery: trio.Nursery, quiet: None
) -> None:
    workers = [await busy_worker(429, b"7").start(nursery) for _ in range(2)]
    gw = await start_gateway(nursery, policy="cache_aware")
    with trio.fail_after(20):
        ids = [await gw.add(w.port) for w in workers]
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
            metrics = samples((await client.get("/metrics")).text)
        with pytest.raises(WorkersBusy) as error:  # the library call: a typed refusal
            await request(gw.gateway, "/v1/chat/completions", CHAT)
    assert [a.status_code for a in answers] == [429] * 3
    assert [a.headers["retry-after"] for a in answers] == ["7"] * 3
    assert {a.json()["error"]["code"] for a in answers} == {"workers_busy"}
    assert {a.headers["x-tmg-gateway"] for a in answers} == {gw.gateway.config.instance_id}
    assert [len(w.requests) for w in workers] == [4, 4]  # each request (3 + 1) tried both, once
    for worker_id in ids:
        assert metrics[("tmg_worker_busy_total", (("worker_id", worker_id),))] == 3
    assert gw.gateway._dataplane.breakers.states() == {}
    assert (error.value.status, error.value.retry_after, error.value.code) == (
        429,
        7,
        "workers_busy",
    )


@pytest.mark.parametrize(
    ("given", "status", "retry_after"),
    [
        ([(429, b"7"), (503, b"3")], 503, "3"),  # mixed: 503, the smaller Retry-After
        ([(503, b"9"), (503, None)], 503, "9"),  # the one given
        ([(429, None), (429, None)], 429, "1"),  # none given: 1
    ],
)
async def test_mixed_busy_answers_make_a_503_with_the_smallest_retry_after(
    nursery: trio.Nursery,
    quiet: None,
    given: list[tuple[int, bytes | None]],
    status: int,
    retry_after: str,
) -> None:
    workers = [await busy_worker(code, after).start(nursery) for code, after in given]
    gw = await start_gateway(nursery)
    with trio.fail_after(20):
        for w in workers:
            await gw.add(w.port)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            answer = await client.post("/v1/chat/completions", json=CHAT)
    assert (answer.status_code, answer.headers["retry-after"]) == (status, retry_after)
    assert answer.json()["error"]["type"] == "server_error"


async def test_busy_and_broken_workers_give_the_client_the_busy_answer_not_a_502(
    nursery: trio.Nursery, quiet: None
) -> None:
    busy = await busy_worker(503, b"2").start(nursery)
    broken = await broken_worker().start(nursery)
    gw = await start_gateway(nursery)
    with trio.fail_after(20):
        busy_id = await gw.add(busy.port)
        broken_id = await gw.add(broken.port)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(2)]
    assert [(a.status_code, a.headers["retry-after"]) for a in answers] == [(503, "2")] * 2
    states = gw.gateway._dataplane.breakers
    assert states.allows(busy_id, trio.current_time())
    assert states._breakers[broken_id].failures == 2  # the broken one's failures still count
    assert busy_id not in states._breakers


def test_a_retry_after_is_read_as_seconds_or_an_http_date_and_capped() -> None:
    def read(value: bytes) -> int | None:
        return _retry_after([(b"content-type", b"x"), (b"retry-after", value)])

    assert read(b"7") == 7
    assert read(b" 0 ") == 0
    assert read(b"99999999999999999999") == MAX_RETRY_AFTER
    soon = email.utils.formatdate(time.time() + 30, usegmt=True).encode()
    assert 28 <= (read(soon) or 0) <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True).encode()
    assert read(past) == 0
    assert read(b"soon") is None
    assert read(b"-5") is None
    assert _retry_after([(b"content-type", b"x")]) is None
