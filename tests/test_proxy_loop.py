"""Loops: a gateway registered as its own worker, or two gateways pointing at each other.

The gateways here find "workers" through the detection stub of ``tests/test_proxy_wire.py``,
which takes any address, this gateway's own included, for a worker serving model "m": exactly
the mistake loop detection exists for.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from actors.registry.service import Gateway
from tests.test_proxy_wire import CHAT, start_gateway


def nothing_loud(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud


async def test_a_gateway_registered_as_its_own_worker_answers_508_at_once_and_keeps_serving(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway(nursery)
    with trio.fail_after(10):
        itself = await gw.add(gw.port)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as client:
            looped = await client.post("/v1/chat/completions", json=CHAT)
            health = await client.get("/health")
        await gw.gateway.inflight.wait_idle(itself)
    assert looped.status_code == 508
    assert looped.json()["error"]["code"] == "loop_detected"
    assert looped.headers["x-worker-id"] == itself  # passed on from the one hop it took
    assert looped.headers["x-tmg-gateway"] == gw.gateway.config.instance_id
    assert health.status_code == 200
    nothing_loud(caplog)


async def test_two_gateways_that_register_each_other_answer_508(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    first = await start_gateway(nursery)
    second = await start_gateway(nursery)
    with trio.fail_after(10):
        await first.add(second.port)
        await second.add(first.port)
        async with httpx.AsyncClient(base_url=first.url, trust_env=False) as client:
            looped = await client.post("/v1/chat/completions", json=CHAT)
            health = await client.get("/health")
    assert looped.status_code == 508
    assert looped.json()["error"]["code"] == "loop_detected"
    assert looped.headers["x-tmg-gateway"] == first.gateway.config.instance_id  # came around
    assert health.status_code == 200
    nothing_loud(caplog)


@pytest.mark.parametrize(("hops", "status"), [(8, 404), (9, 508)])
async def test_a_request_that_passed_through_more_than_eight_gateways_is_refused(
    client: httpx.AsyncClient, hops: int, status: int
) -> None:
    via = ", ".join(f"gateway{hop}" for hop in range(hops))
    answer = await client.post("/v1/chat/completions", json=CHAT, headers={"x-tmg-via": via})
    assert answer.status_code == status  # 404: let through, and no worker serves "m"
    assert answer.json()["error"]["code"] == {404: "model_not_found", 508: "loop_detected"}[status]


async def test_a_request_naming_this_gateway_in_any_hop_header_is_refused(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    me = gateway.config.instance_id
    answer = await client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers=[("x-tmg-via", "elsewhere"), ("x-tmg-via", f"other,{me}")],
    )
    assert answer.status_code == 508
    assert answer.json()["error"]["type"] == "server_error"


async def test_every_answer_the_gateway_makes_itself_names_it(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    me = gateway.config.instance_id
    models = await client.get("/v1/models")
    missing = await client.post("/v1/chat/completions", json=CHAT)
    invalid = await client.post("/v1/chat/completions", content=b"{")
    wrong_method = await client.get("/v1/completions")
    assert [a.status_code for a in (models, missing, invalid, wrong_method)] == [200, 404, 400, 405]
    assert {a.headers["x-tmg-gateway"] for a in (models, missing, invalid, wrong_method)} == {me}
