"""Registering an address that answers as this gateway fails after one attempt (no retries)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import trio

from actors import open_gateway, worker_spec
from actors.core.errors import WorkerFailed
from api.app import create_app
from tests.conftest import FAST

OUR_ID = "5eed5eed5eed5eed"


async def answer_as(mark: str, stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        body = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"x-tmg-gateway: " + mark.encode() + b"\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )


async def test_an_address_answering_as_this_gateway_fails_after_one_attempt(
    nursery: trio.Nursery,
) -> None:
    [listener] = await nursery.start(
        partial(trio.serve_tcp, partial(answer_as, OUR_ID), 0, host="127.0.0.1")
    )
    port = listener.socket.getsockname()[1]
    config = replace(FAST, instance_id=OUR_ID, max_connection_attempts=20)
    with trio.fail_after(10):
        async with open_gateway(config) as gateway:
            worker = await gateway.add_worker(worker_spec(f"127.0.0.1:{port}"))
            try:
                await gateway.wait_status(worker.id, "ready", 5)
            except WorkerFailed as failed:
                reason = failed.reason
            else:
                raise AssertionError("the loop became ready")
            worker = gateway.get_worker(worker.id)
    assert "this gateway itself" in reason
    assert worker.job is not None and worker.job.attempts == 1


async def test_every_management_answer_names_the_gateway_that_gave_it() -> None:
    async with open_gateway(FAST) as gateway:
        app = create_app(gateway)
        client = app.test_client()
        for path in ("/health", "/workers", "/workers/nope", "/openapi.json"):
            response = await client.get(path)
            assert response.headers["x-tmg-gateway"] == gateway.config.instance_id, path
