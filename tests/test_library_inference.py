"""Inference as a library call (actors/dataplane/client.py) against real fake-worker servers."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import trio
import trio.testing

from actors.dataplane.client import (
    InvalidRequest,
    ModelNotFound,
    NoWorkerAvailable,
    UpstreamFailed,
    request,
    stream,
)
from actors.registry.service import Gateway
from scripts.fake_worker import FakeWorker
from tests.conftest import StartWorkers, register

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def worker_connections(worker: FakeWorker) -> list[trio.SocketStream]:
    """The sockets ``worker`` is serving right now (its connection tasks' streams)."""
    found = []
    root = trio.lowlevel.current_root_task()
    assert root is not None
    tasks = [root]
    while tasks:
        task = tasks.pop()
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
        frame = getattr(task.coro, "cr_frame", None)
        if (
            task.coro.cr_code.co_name == "_connection"
            and frame is not None
            and frame.f_locals.get("self") is worker
        ):
            found.append(frame.f_locals["stream"])
    return found


def peer_closed(stream: trio.SocketStream) -> bool:
    """Whether the worker's end reads EOF or a reset (without consuming anything)."""
    with socket.socket(fileno=os.dup(stream.socket.fileno())) as sock:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:  # closed with the worker's tokens unread: a reset
            return True


async def test_a_request_answers_with_status_worker_and_json(
    gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        [worker_id] = await register(gateway, [worker.port])
        answer = await request(gateway, "/v1/chat/completions", CHAT)
        raw = await request(gateway, "/v1/completions", b'{"model": "m", "prompt": "a"}')
    assert (answer.status, answer.worker_id) == (200, worker_id)
    assert answer.json()["choices"][0]["message"]["content"].startswith(f"[port {worker.port}]")
    assert answer.header("X-Worker-Id") == worker_id
    assert raw.json()["object"] == "text_completion"
    assert worker.counts["POST /v1/chat/completions"] == 1
    assert gateway.inflight.count(worker_id) == 0
    metrics = gateway.metrics.render().decode()
    assert f'tmg_requests_total{{code="200",model="m",worker_id="{worker_id}"}} 2.0' in metrics


async def test_a_stream_read_to_the_end_yields_each_parsed_chunk_until_done(
    gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        [worker_id] = await register(gateway, [worker.port])
        async with stream(gateway, "/v1/chat/completions", {**CHAT, "stream": True}) as events:
            assert (events.status, events.worker_id) == (200, worker_id)
            assert gateway.inflight.count(worker_id) == 1
            chunks: list[Any] = [event async for event in events]
        assert gateway.inflight.count(worker_id) == 0
        # the connection went back to the pool: the next request reuses it
        await request(gateway, "/v1/chat/completions", CHAT)
    assert len(chunks) == 4
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len(worker_connections(worker)) >= 1


async def test_a_stream_left_half_way_cancels_the_upstream_and_releases_the_worker(
    gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m", token_delay=0.001)
    body = {**CHAT, "stream": True, "max_tokens": 100_000}
    with trio.fail_after(10):
        [worker_id] = await register(gateway, [worker.port])
        before = set(map(id, worker_connections(worker)))
        async with stream(gateway, "/v1/chat/completions", body) as events:
            for _ in range(3):
                await events.__anext__()
            [serving] = [s for s in worker_connections(worker) if id(s) not in before]
            assert gateway.inflight.count(worker_id) == 1
            assert not peer_closed(serving)
        # out of the block: cancelled, the connection closed, the count released
        assert gateway.inflight.count(worker_id) == 0
        assert peer_closed(serving)  # the worker's socket reads EOF: it sees the disconnect
    assert worker.counts["POST /v1/chat/completions"] == 1


async def test_an_exception_inside_the_block_comes_out_as_itself(
    gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m", token_delay=0.001)
    with trio.fail_after(10):
        [worker_id] = await register(gateway, [worker.port])
        with pytest.raises(KeyError):
            async with stream(gateway, "/v1/chat/completions", {**CHAT, "stream": True}):
                raise KeyError("mine")
    assert gateway.inflight.count(worker_id) == 0


async def test_an_unknown_model_is_model_not_found_with_the_http_message(
    gateway: Gateway,
) -> None:
    with pytest.raises(ModelNotFound) as request_error:
        await request(gateway, "/v1/chat/completions", {**CHAT, "model": "nope"})
    with pytest.raises(ModelNotFound) as stream_error:
        async with stream(gateway, "/v1/chat/completions", {**CHAT, "model": "nope"}):
            pass
    for error in (request_error.value, stream_error.value):
        assert (error.status, error.code) == (404, "model_not_found")
        assert error.message == "no worker serves model 'nope'"


async def test_every_worker_draining_is_no_worker_available_with_a_retry_hint(
    gateway: Gateway, start_workers: StartWorkers
) -> None:
    workers = await start_workers(2, model="m")
    with trio.fail_after(10):
        ids = await register(gateway, [w.port for w in workers])
        for worker_id in ids:
            gateway.inflight.acquire(worker_id)  # busy: DELETE drains instead of removing
            await gateway.remove_worker(worker_id)
        with pytest.raises(NoWorkerAvailable) as error:
            await request(gateway, "/v1/chat/completions", CHAT)
        for worker_id in ids:
            gateway.inflight.release(worker_id)
    assert (error.value.status, error.value.retry_after) == (503, 1)
    assert error.value.message == "no worker for model 'm' can take a request now"
    assert not any(w.counts["POST /v1/chat/completions"] for w in workers)


async def test_a_worker_that_is_gone_is_upstream_failed_after_the_retries(
    gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        await register(gateway, [worker.port])
        worker.close_listeners()
        with pytest.raises(UpstreamFailed) as error:
            await request(gateway, "/v1/chat/completions", CHAT)
    assert error.value.status == 502


@pytest.mark.parametrize(
    "body", [b"{", b"[]", {"messages": []}, {"model": 3}, {"model": "m", "x": object()}]
)
async def test_a_bad_body_is_invalid_request_before_anything_is_sent(
    gateway: Gateway, body: Any
) -> None:
    with pytest.raises(InvalidRequest) as error:
        await request(gateway, "/v1/chat/completions", body)
    assert error.value.status == 400
    with pytest.raises(ValueError):
        await request(gateway, "/v1/unknown", CHAT)
