"""serve_api on either server: the same API, the same answers."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio

from actors.registry.service import Gateway
from api.serve import serve_api
from tests.conftest import StartWorkers

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("server", ["http1", "hypercorn"])
async def test_both_servers_carry_the_management_api_and_the_proxy(
    gateway: Gateway, nursery: trio.Nursery, start_workers: StartWorkers, server: str
) -> None:
    [worker] = await start_workers(1, model="m")
    [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0", server=server))
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        with trio.fail_after(10):
            created = await client.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
            worker_id = created.json()["worker_id"]
            await gateway.wait_status(worker_id, "ready", 5)
            chat = await client.post("/v1/chat/completions", json=CHAT)
            missing = await client.get("/workers/6f1c2b43-9a55-4a1e-8a0e-3f0b8d9c1e21")
            bad = await client.post(
                "/workers", content=b"{", headers={"content-type": "application/json"}
            )
    assert created.status_code == 202
    assert chat.status_code == 200
    assert chat.headers["x-worker-id"] == worker_id
    assert (missing.status_code, missing.json()["code"]) == (404, "WORKER_NOT_FOUND")
    assert bad.status_code == 400


async def test_an_unknown_server_is_refused(gateway: Gateway) -> None:
    with pytest.raises(ValueError, match="server"):
        await serve_api(gateway, bind="127.0.0.1:0", server="nginx")
