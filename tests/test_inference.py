"""The data plane over real sockets: the inference routes through the gateway to fake workers."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import MutableMapping
from typing import Any

import httpx
import jsonschema
import pytest
import trio
import trio.testing

from actors import worker_spec
from actors.core.model import Worker, WorkerStatus
from actors.dataplane.proxy import DataPlane, ProxyRequest
from actors.dataplane.routing import RouteRequest
from actors.registry.service import Gateway
from api.inference import CANCEL_ON_DISCONNECT, inference_app
from tests.conftest import Open, StartWorkers, register

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_chat_and_completions_pass_through_with_the_worker_id(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        [worker_id] = await register(gateway, [worker.port])
        chat = await client.post("/v1/chat/completions", json=CHAT)
        completion = await client.post("/v1/completions", json={"model": "m", "prompt": "a"})
        embedding = await client.post("/v1/embeddings", json={"model": "m", "input": "a"})
        generated = await client.post("/generate", json={"model": "m", "text": "a"})
        models = (await client.get("/v1/models")).json()
    assert chat.status_code == 200
    assert chat.headers["x-worker-id"] == worker_id
    assert chat.json()["choices"][0]["message"]["content"].startswith(f"[port {worker.port}]")
    assert completion.json()["object"] == "text_completion"
    assert embedding.json()["object"] == "list"
    assert "text" in generated.json()
    assert models["data"] == [{"id": "m", "object": "model", "created": 0, "owned_by": "sglang"}]
    assert worker.counts["POST /v1/chat/completions"] == 1


async def test_a_stream_passes_through_chunk_by_chunk(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        await register(gateway, [worker.port])
        chunks = []
        async with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    chunks.append(line.removeprefix("data: "))
    assert chunks[-1] == "[DONE]"
    assert len(chunks) == 4 + 1
    assert json.loads(chunks[0])["object"] == "chat.completion.chunk"


async def test_unknown_model_is_404_and_an_unroutable_one_is_503_with_retry_after(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        unknown = await client.post("/v1/chat/completions", json=CHAT)
        [worker_id] = await register(gateway, [worker.port])
        gateway.inflight.acquire(worker_id)  # keeps it draining
        await gateway.remove_worker(worker_id)
        draining = await client.post("/v1/chat/completions", json=CHAT)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert draining.status_code == 503
    assert draining.json()["error"]["code"] == "no_available_workers"
    assert draining.headers["retry-after"] == "1"


async def test_a_model_served_only_by_grpc_workers_is_501(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, flavor="grpc")
    with trio.fail_after(10):
        await register(gateway, [worker.port], model_id="m")
        answer = await client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 501
    assert "gRPC" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [(b"{", 400, None), (b"[]", 400, None), (b'{"model": 3}', 400, "model"), (b"{}", 400, "model")],
)
async def test_a_bad_body_is_a_400_in_the_openai_shape(
    client: httpx.AsyncClient, body: bytes, status: int, param: str | None
) -> None:
    answer = await client.post("/v1/chat/completions", content=body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_round_robin_spreads_evenly_over_three_workers(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    workers = await start_workers(3, model="m")
    with trio.fail_after(20):
        ids = await register(gateway, [w.port for w in workers])
        seen: Counter[str] = Counter()
        for _ in range(90):
            seen[(await client.post("/v1/chat/completions", json=CHAT)).headers["x-worker-id"]] += 1
    assert seen == {worker_id: 30 for worker_id in ids}


async def test_consistent_hash_keeps_each_session_on_one_worker(
    open_with: Open, start_workers: StartWorkers
) -> None:
    workers = await start_workers(3, model="m")
    gateway, client = await open_with(policy="consistent_hash")
    with trio.fail_after(20):
        await register(gateway, [w.port for w in workers])
        placement: dict[str, set[str]] = {}
        for round_ in range(5):
            for session in range(12):
                headers = {"x-session-id": f"s{session}"}
                answer = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
                placement.setdefault(f"s{session}", set()).add(answer.headers["x-worker-id"])
            by_user = await client.post("/v1/chat/completions", json={**CHAT, "user": "s3"})
            assert {by_user.headers["x-worker-id"]} == placement["s3"], round_
    assert all(len(owners) == 1 for owners in placement.values())
    assert len(set.union(*placement.values())) > 1  # sessions are spread over workers


async def test_cache_aware_sends_a_repeated_prefix_to_the_same_worker(
    open_with: Open, start_workers: StartWorkers
) -> None:
    workers = await start_workers(3, model="m")
    gateway, client = await open_with(policy="cache_aware")
    system = "You are a careful assistant who answers in French. " * 4
    with trio.fail_after(20):
        await register(gateway, [w.port for w in workers])
        owners = set()
        for question in range(15):
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"q{question}"},
            ]
            answer = await client.post(
                "/v1/chat/completions", json={"model": "m", "messages": messages}
            )
            owners.add(answer.headers["x-worker-id"])
    assert len(owners) == 1


async def test_a_drained_worker_with_a_long_stream_is_removed_only_when_it_ends(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m", token_delay=0.005)
    with trio.fail_after(20):
        [worker_id] = await register(gateway, [worker.port])
        body = {**CHAT, "stream": True, "max_tokens": 40}
        async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
            lines = answer.aiter_lines()
            await lines.__anext__()  # the stream is flowing
            deleted = await client.delete(f"/workers/{worker_id}")
            assert deleted.json()["worker_status"] == "draining"
            assert gateway.get_worker(worker_id).status.value == "draining"
            async for _ in lines:
                pass
        await gateway.wait_removed(worker_id, 5)
    assert gateway.inflight.count(worker_id) == 0


async def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_request(
    base_url: str, gateway: Gateway, start_workers: StartWorkers, caplog: pytest.LogCaptureFixture
) -> None:
    [worker] = await start_workers(1, model="m", token_delay=0.01)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 4000}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with trio.fail_after(20):
        [worker_id] = await register(gateway, [worker.port])
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(head.encode() + body)
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some()
            assert gateway.inflight.count(worker_id) == 1
        # the client went away after the first chunk: the upstream request ends at once
        await gateway.inflight.wait_idle(worker_id)
        await trio.testing.wait_all_tasks_blocked()  # the app call has ended
    assert worker.counts["POST /v1/chat/completions"] == 1
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_json_nested_too_deeply_is_a_400_not_a_crash(
    client: httpx.AsyncClient, depth: int
) -> None:
    body = b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    answer = await client.post("/v1/chat/completions", content=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert "nested too deeply" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_under_a_server_that_cancels_on_disconnect_the_app_starts_no_watcher(
    gateway: Gateway, start_workers: StartWorkers, stream: bool
) -> None:
    [worker] = await start_workers(1, model="m")
    body = json.dumps({**CHAT, "stream": stream}).encode()
    received = 0
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received > 1:  # only a watcher asks again after the body
            await trio.sleep_forever()
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def fallback(*_: object) -> None:
        raise AssertionError("not an inference route")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "headers": [(b"content-type", b"application/json")],
        "extensions": {CANCEL_ON_DISCONNECT: {}},
    }
    app = inference_app(gateway, fallback)
    with trio.fail_after(10):
        await register(gateway, [worker.port])
        await app(scope, receive, send)
    assert received == 1
    assert sent[0]["status"] == 200
    assert sent[-1]["more_body"] is False


async def test_a_dead_worker_costs_retries_not_errors_and_its_breaker_opens(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [steady] = await start_workers(1, model="m")
    [dying] = await start_workers(1, model="m", die_after=5)  # 4 detection probes + 1 request
    with trio.fail_after(20):
        [_, dying_id] = await register(gateway, [steady.port, dying.port])
        statuses = Counter(
            [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(30)]
        )
        metrics = (await client.get("/metrics")).text
    assert statuses == {200: 30}
    assert f'tmg_circuit_breaker_state{{worker_id="{dying_id}"}} 1.0' in metrics
    retries = [line for line in metrics.splitlines() if line.startswith("tmg_retries_total")]
    assert retries and float(retries[0].split()[-1]) >= 1
    assert steady.counts["POST /v1/chat/completions"] >= 29


async def test_inference_answers_match_the_openapi_description(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(10):
        await register(gateway, [worker.port])
        document = (await client.get("/openapi.json")).json()
        models = (await client.get("/v1/models")).json()
        missing = (await client.post("/v1/chat/completions", json={**CHAT, "model": "x"})).json()

    def check(instance: object, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    check(models, "ModelList")
    check(missing, "OpenAIError")
    check(CHAT, "InferenceRequest")
    assert {"/v1/chat/completions", "/v1/models", "/generate"} <= set(document["paths"])


def test_only_the_workers_own_api_key_is_sent_to_it() -> None:
    request = ProxyRequest(path=b"/v1/completions", body=b"{}", route=RouteRequest(model="m"))
    keyed = Worker(
        id="w",
        spec=worker_spec("a:1", api_key="sk-worker"),
        status=WorkerStatus.READY,
        created_at=0,
        updated_at=0,
    )
    bare = Worker(
        id="v", spec=worker_spec("b:1"), status=WorkerStatus.READY, created_at=0, updated_at=0
    )
    assert (b"authorization", b"Bearer sk-worker") in DataPlane._headers(keyed, request)
    assert all(name != b"authorization" for name, _ in DataPlane._headers(bare, request))
