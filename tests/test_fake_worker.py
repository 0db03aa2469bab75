"""The fake SGLang / vLLM / gRPC worker, over real sockets on OS-chosen ports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from scripts.fake_worker import (
    H2_GOAWAY,
    H2_PREFACE,
    H2_SETTINGS,
    H2_SETTINGS_ACK,
    MAX_BODY,
    FakeWorker,
    FakeWorkerConfig,
    parse_ports,
    serve_fake_workers,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fake_worker.py"
CHAT = "/v1/chat/completions"


async def start(nursery: trio.Nursery, count: int = 1, **options: Any) -> list[FakeWorker]:
    config = FakeWorkerConfig(**options)
    workers: list[FakeWorker] = await nursery.start(serve_fake_workers, [0] * count, config)
    return workers


def client(worker: FakeWorker) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.port}")


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def sse_events(c: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    async with c.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["transfer-encoding"] == "chunked"
        return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def test_an_sglang_worker_answers_the_sglang_detection_routes_and_not_version(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, model="m1")
    with trio.fail_after(10):
        async with client(worker) as c:
            health = await c.get("/health")
            models = (await c.get("/v1/models")).json()
            infos = [(await c.get(p)).json() for p in ("/server_info", "/get_server_info")]
            model_infos = [(await c.get(p)).json() for p in ("/model_info", "/get_model_info")]
            version = await c.get("/version")
    assert (health.status_code, health.content) == (200, b"")
    assert health.headers["x-fake-worker-port"] == str(worker.port)
    assert models["object"] == "list"
    assert models["data"][0] | {"created": 0} == {
        "id": "m1",
        "object": "model",
        "created": 0,
        "owned_by": "sglang",
        "root": "m1",
        "max_model_len": 4096,
    }
    for info in infos:
        assert info["model_path"] == info["served_model_name"] == "m1"
        assert (info["port"], info["dp_size"], info["version"]) == (worker.port, 1, "0.0.0-fake")
    for model_info in model_infos:
        assert model_info["is_generation"] is True
        assert model_info["architectures"] == ["LlamaForCausalLM"]
    assert version.status_code == 404


async def test_a_vllm_worker_answers_version_and_not_the_sglang_info_routes(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, flavor="vllm")
    with trio.fail_after(10):
        async with client(worker) as c:
            version = await c.get("/version")
            health = await c.get("/health")
            owner = (await c.get("/v1/models")).json()["data"][0]["owned_by"]
            sglang_only = [
                (await c.get(p)).status_code
                for p in ("/server_info", "/get_server_info", "/model_info", "/get_model_info")
            ]
            generate = await c.post("/generate", json={"text": "hi"})
    assert (version.status_code, version.json()) == (200, {"version": "0.0.0-fake"})
    assert version.headers["content-type"] == "application/json"
    assert health.status_code == 200
    assert owner == "vllm"
    assert sglang_only == [404, 404, 404, 404]
    assert generate.status_code == 404


async def test_each_port_is_an_independent_worker_with_its_own_config_copy(
    nursery: trio.Nursery,
) -> None:
    config = FakeWorkerConfig()
    workers = await nursery.start(serve_fake_workers, [0, 0, 0], config)
    assert len({w.port for w in workers}) == 3
    workers[1].config.fail_health = True
    assert config.fail_health is False
    with trio.fail_after(10):
        statuses = []
        for worker in workers:
            async with client(worker) as c:
                response = await c.get("/health")
                statuses.append(response.status_code)
                assert response.headers["x-fake-worker-port"] == str(worker.port)
    assert statuses == [200, 503, 200]
    assert [w.counts["GET /health"] for w in workers] == [1, 1, 1]


async def test_a_non_streaming_chat_completion_returns_max_tokens_tokens_and_usage(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    messages = [{"role": "user", "content": "hello there"}]
    with trio.fail_after(10):
        async with client(worker) as c:
            response = await c.post(
                CHAT, json={"model": "fake-model", "messages": messages, "max_tokens": 3}
            )
            default = (await c.post(CHAT, json={"model": "fake-model", "messages": []})).json()
    body = response.json()
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": f"[port {worker.port}] tok tok",
    }
    assert body["usage"]["completion_tokens"] == 3
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert default["usage"]["completion_tokens"] == 8
    assert default["choices"][0]["message"]["content"].count(" tok") == 7


async def test_big_answer_bytes_pads_a_plain_chat_completion_to_that_size_the_same_each_time(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, big_answer_bytes=100_000)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(10):
        async with client(worker) as c:
            first, second = [await c.post(CHAT, json=chat | {"max_tokens": 2}) for _ in "12"]
            small = await c.post(CHAT, json=chat | {"max_tokens": 2, "model": "other"})
    assert (first.status_code, len(first.content)) == (200, 100_000)
    assert len(second.content) == 100_000
    content, tokens = first.json()["choices"][0]["message"]["content"], f"[port {worker.port}] tok"
    assert content == tokens + "x" * (len(content) - len(tokens))
    assert len(content) > 99_000
    assert second.json()["choices"] == first.json()["choices"]
    assert first.json()["usage"]["completion_tokens"] == 2
    assert small.status_code == 404  # refusals are not padded
    assert len(small.content) < 1000


async def test_big_answer_bytes_leaves_streams_and_text_completions_as_they_were(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, big_answer_bytes=100_000)
    with trio.fail_after(10):
        async with client(worker) as c:
            text = await c.post(
                "/v1/completions", json={"model": "fake-model", "prompt": "a", "max_tokens": 2}
            )
            events = await sse_events(
                c, CHAT, {"model": "fake-model", "messages": [], "max_tokens": 2, "stream": True}
            )
    assert text.json()["choices"][0]["text"] == f"[port {worker.port}] tok"
    assert len(events) == 3
    assert events[-1] == "[DONE]"


async def test_a_non_streaming_completion_returns_a_text_completion(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    with trio.fail_after(10):
        async with client(worker) as c:
            response = await c.post(
                "/v1/completions", json={"model": "fake-model", "prompt": "a b", "max_tokens": 2}
            )
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == f"[port {worker.port}] tok"
    assert body["usage"]["completion_tokens"] == 2


async def test_a_streaming_chat_completion_sends_one_chunk_per_token_then_done(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, token_delay=0.001)
    request = {"model": "fake-model", "messages": [], "max_tokens": 5, "stream": True}
    with trio.fail_after(10):
        async with client(worker) as c:
            events = await sse_events(c, CHAT, request)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == f"[port {worker.port}]" + " tok" * 4
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]


async def test_a_streaming_completion_sends_text_completion_chunks_then_done(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    request = {"model": "fake-model", "prompt": "x", "max_tokens": 3, "stream": True}
    with trio.fail_after(10):
        async with client(worker) as c:
            events = await sse_events(c, "/v1/completions", request)
            with_usage = await sse_events(
                c, "/v1/completions", request | {"stream_options": {"include_usage": True}}
            )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert "".join(c["choices"][0]["text"] for c in chunks) == f"[port {worker.port}] tok tok"
    assert len(with_usage) == 5
    assert json.loads(with_usage[-2])["usage"]["completion_tokens"] == 3


async def test_a_client_hanging_up_mid_stream_leaves_the_worker_serving(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, token_delay=0.01)
    body = json.dumps({"model": "fake-model", "max_tokens": 1000, "stream": True}).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", worker.port)
        async with stream:  # (raw, as httpx's nested async generators warn when abandoned)
            await stream.send_all(head.encode() + body)
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some(65536)
        # ... hung up with ~1000 chunks to go
        async with client(worker) as c:
            assert (await c.get("/health")).status_code == 200


async def test_embeddings_and_sglang_generate_answer_their_shapes(nursery: trio.Nursery) -> None:
    [worker] = await start(nursery)
    with trio.fail_after(10):
        async with client(worker) as c:
            embeddings = await c.post(
                "/v1/embeddings", json={"model": "fake-model", "input": ["a", "b"]}
            )
            generate = await c.post(
                "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}
            )
    assert embeddings.json()["object"] == "list"
    assert [d["index"] for d in embeddings.json()["data"]] == [0, 1]
    assert generate.json()["text"] == f"[port {worker.port}] tok"
    assert generate.json()["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'{"messages": []}', 400),
        (b'{"model": "fake-model", "max_tokens": "many"}', 400),
        (b'{"model": "another-model", "messages": []}', 404),
    ],
)
async def test_a_bad_body_gets_400_and_an_unknown_model_404(
    nursery: trio.Nursery, body: bytes, status: int
) -> None:
    [worker] = await start(nursery)
    with trio.fail_after(10):
        async with client(worker) as c:
            response = await c.post(CHAT, content=body)
    assert response.status_code == status
    assert "message" in response.json()["error"]


async def test_an_unknown_route_gets_a_json_404_and_stats_count_every_route(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    with trio.fail_after(10):
        async with client(worker) as c:
            missing = await c.get("/nope?x=1")
            await c.get("/health")
            stats = (await c.get("/_stats")).json()
    assert missing.status_code == 404
    assert "error" in missing.json()
    assert stats == {
        "port": worker.port,
        "counts": {"GET /nope": 1, "GET /health": 1, "GET /_stats": 1},
    }


async def test_flipping_fail_health_at_run_time_turns_health_503_and_back(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    with trio.fail_after(10):
        async with client(worker) as c:
            before = (await c.get("/health")).status_code
            worker.config.fail_health = True
            failing = (await c.get("/health")).status_code
            models = (await c.get("/v1/models")).status_code
            worker.config.fail_health = False
            after = (await c.get("/health")).status_code
    assert (before, failing, models, after) == (200, 503, 200, 200)


async def test_a_large_startup_delay_answers_every_route_503_loading(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, startup_delay=3600)
    with trio.fail_after(10):
        async with client(worker) as c:
            responses = [await c.get("/health"), await c.post(CHAT, json={"model": "fake-model"})]
    assert [r.status_code for r in responses] == [503, 503]
    assert [r.json() for r in responses] == [{"error": "loading"}] * 2


async def test_latency_delays_inference_answers(nursery: trio.Nursery) -> None:
    [worker] = await start(nursery, latency=0.2)
    with trio.fail_after(10):
        async with client(worker) as c:
            began = trio.current_time()
            response = await c.post(CHAT, json={"model": "fake-model", "messages": []})
            assert trio.current_time() - began >= 0.2
    assert response.status_code == 200


async def test_die_after_answers_n_requests_then_refuses_new_connections(
    nursery: trio.Nursery,
) -> None:
    [worker, other] = await start(nursery, count=2, die_after=3)
    with trio.fail_after(10):
        idle = await trio.open_tcp_stream("127.0.0.1", worker.port)
        async with idle:
            async with client(worker) as c:
                statuses = [(await c.get("/health")).status_code for _ in range(3)]
            assert await idle.receive_some(100) == b""  # open connections get closed too
        async with client(worker) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/health")
        async with client(other) as c:
            assert (await c.get("/health")).status_code == 200
    assert statuses == [200, 200, 200]
    assert worker.counts["GET /health"] == 3


async def test_the_grpc_flavour_answers_an_http2_preface_with_settings_then_an_ack(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, flavor="grpc")
    client_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", worker.port)
        async with stream:
            await stream.send_all(H2_PREFACE[:10])  # a preface split over two writes
            await stream.send_all(H2_PREFACE[10:] + client_settings)
            received = b""
            while len(received) < 18:
                received += await stream.receive_some(100)
    assert received == H2_SETTINGS + H2_SETTINGS_ACK
    assert received[:9] == bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    assert received[9:] == bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])
    assert worker.counts["h2 preface"] == 1


async def test_the_grpc_flavour_answers_http1_with_goaway_and_closes(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, flavor="grpc")
    with trio.fail_after(10):
        received = await exchange(worker.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        async with client(worker) as c:
            with pytest.raises(httpx.TransportError):
                await c.get("/health")
    assert received == H2_GOAWAY
    assert received[3] == 0x7  # GOAWAY, last stream 0, error PROTOCOL_ERROR
    assert int.from_bytes(received[9:13], "big") == 0
    assert int.from_bytes(received[13:17], "big") == 1


async def test_keep_alive_serves_several_requests_on_one_connection(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with trio.fail_after(10):
        received = await exchange(worker.port, get + get + last)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert worker.counts["GET /health"] == 3


async def test_head_is_answered_without_a_body_and_expect_100_continue_gets_a_100(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    head = b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b'{"model": "fake-model", "max_tokens": 1}'
    post = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", worker.port)
        async with stream:
            await stream.send_all(head + post)
            received = b""
            while b"100 Continue" not in received:
                received += await stream.receive_some(65536)
            await stream.send_all(body)
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 0\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK" in received
    answer = json.loads(received.rsplit(b"\r\n\r\n", 1)[1])
    assert answer["choices"][0]["message"]["content"] == f"[port {worker.port}]"


async def test_a_body_over_8_mib_gets_413_and_a_malformed_request_400(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery)
    huge = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
    with trio.fail_after(10):
        too_big = await exchange(worker.port, huge.encode() + b"{")
        garbage = await exchange(worker.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert too_big.startswith(b"HTTP/1.1 413 ")
    assert garbage.startswith(b"HTTP/1.1 400 ")


async def test_cancelling_the_nursery_closes_the_ports() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            [worker] = await start(nursery)
            async with client(worker) as c:
                assert (await c.get("/health")).status_code == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", worker.port)


def test_port_specs_accept_ranges_comma_lists_and_a_count() -> None:
    assert parse_ports("41000-41002") == [41000, 41001, 41002]
    assert parse_ports("41000,41005-41006") == [41000, 41005, 41006]
    assert parse_ports("0", count=3) == [0, 0, 0]
    with pytest.raises(ValueError):
        parse_ports("41000", count=2)


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        assert chunk, f"EOF before a line: {data!r}"
        data += chunk
    return data.split(b"\n", 1)[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_cli_prints_its_ports_serves_them_and_exits_0_on_a_signal(
    signum: signal.Signals,
) -> None:
    command = [sys.executable, str(SCRIPT), "--count", "2", "--flavor", "vllm", "--model", "m"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(run, check=False))
            assert process.stdout is not None
            assert process.stderr is not None
            async with process.stdout, process.stderr:
                info = json.loads(await read_line(process.stdout))
                ports = info["listening"]
                assert len(ports) == 2
                assert info | {"listening": []} == {
                    "listening": [],
                    "host": "127.0.0.1",
                    "model": "m",
                    "flavor": "vllm",
                }
                async with httpx.AsyncClient() as c:
                    response = await c.get(f"http://127.0.0.1:{ports[1]}/version")
                process.send_signal(signum)
                assert await process.wait() == 0
                report = json.loads(await read_line(process.stderr))
    assert response.status_code == 200
    assert report == {"counts": {str(ports[0]): {}, str(ports[1]): {"GET /version": 1}}}


async def test_the_cli_serves_big_answers_of_big_answer_bytes() -> None:
    command = [sys.executable, str(SCRIPT), "--count", "1", "--big-answer-bytes", "50000"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(run, check=False))
            assert process.stdout is not None
            async with process.stdout:
                [port] = json.loads(await read_line(process.stdout))["listening"]
                async with httpx.AsyncClient() as c:
                    response = await c.post(
                        f"http://127.0.0.1:{port}{CHAT}",
                        json={"model": "fake-model", "messages": [], "max_tokens": 1},
                    )
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
    assert (response.status_code, len(response.content)) == (200, 50_000)
    assert response.json()["choices"][0]["message"]["content"].endswith("x" * 49_000)


# ---- the cache model (--cache-blocks ...) ----


def chat_turn(*contents: str, stream: bool = False) -> dict[str, Any]:
    messages = [{"role": "user", "content": c} for c in contents]
    return {"model": "fake-model", "messages": messages, "max_tokens": 3, "stream": stream}


async def test_with_the_cache_model_answers_report_prompt_cached_and_queue_headers(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, cache_blocks=64, block_tokens=4, decode_ms_per_token=0.0)
    system = " ".join(f"s{i}" for i in range(20))
    with trio.fail_after(10):
        async with client(worker) as c:
            first = await c.post(CHAT, json=chat_turn(system, "hello there"))
            second = await c.post(CHAT, json=chat_turn(system, "hello there", "and more words"))
            async with c.stream("POST", CHAT, json=chat_turn(system, stream=True)) as streamed:
                events = [line async for line in streamed.aiter_lines() if line]
            text = await c.post(
                "/v1/completions", json={"model": "fake-model", "prompt": system, "max_tokens": 1}
            )
            refused = await c.post(CHAT, json=chat_turn(system) | {"model": "other"})
            stats = (await c.get("/_stats")).json()
    assert first.status_code == 200
    assert first.json()["choices"][0]["message"]["content"] == f"[port {worker.port}] tok tok"
    assert (first.headers["x-prompt-tokens"], first.headers["x-cached-tokens"]) == ("22", "0")
    assert float(first.headers["x-queue-ms"]) < 50  # nothing else was queued
    assert "x-prefill-ms" in first.headers
    assert (second.headers["x-prompt-tokens"], second.headers["x-cached-tokens"]) == ("25", "20")
    assert streamed.status_code == 200
    assert streamed.headers["x-cached-tokens"] == "20"
    assert events[-1] == "data: [DONE]"
    assert len(events) == 4
    assert (text.headers["x-prompt-tokens"], text.headers["x-cached-tokens"]) == ("20", "20")
    assert refused.status_code == 404
    assert "x-cached-tokens" not in refused.headers  # refusals bypass the model
    assert stats["cache"] | {"blocks": 0} == {
        "blocks": 0,
        "evictions": 0,
        "waiting": 0,
        "running": 0,
        "prompt_tokens": 22 + 25 + 20 + 20,
        "cached_tokens": 20 * 3,
    }
    assert stats["cache"]["blocks"] == 6  # s0-s19 (5 blocks) and s20... with "hello": 1 more


async def test_cached_tokens_grow_turn_by_turn_on_a_growing_history(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, cache_blocks=1000, block_tokens=4, decode_ms_per_token=0.0)
    history = [" ".join(f"s{i}" for i in range(40))]
    cached = []
    with trio.fail_after(10):
        async with client(worker) as c:
            for turn in range(4):
                history.append(" ".join(f"u{turn}-{i}" for i in range(10)))
                response = await c.post(CHAT, json=chat_turn(*history))
                cached.append(int(response.headers["x-cached-tokens"]))
    assert cached == [0, 48, 60, 68]  # every whole block of the previous turn's prompt
    assert cached == sorted(cached)


async def test_each_port_has_its_own_cache(nursery: trio.Nursery) -> None:
    workers = await start(nursery, count=2, cache_blocks=100, block_tokens=4)
    prompt = chat_turn(" ".join(f"w{i}" for i in range(16)))
    with trio.fail_after(10):
        async with client(workers[0]) as c:
            await c.post(CHAT, json=prompt)
            again = await c.post(CHAT, json=prompt)
        async with client(workers[1]) as c:
            other = await c.post(CHAT, json=prompt)
    assert again.headers["x-cached-tokens"] == "16"
    assert other.headers["x-cached-tokens"] == "0"
    assert other.headers["x-fake-worker-port"] == str(workers[1].port)


async def test_a_worker_with_one_slot_queues_the_second_request_until_the_first_is_sent(
    nursery: trio.Nursery,
) -> None:
    [worker] = await start(nursery, cache_blocks=10, slots=1, decode_ms_per_token=50.0)
    with trio.fail_after(10):
        async with client(worker) as c, trio.open_nursery() as inner:
            answers: list[httpx.Response] = []

            async def ask() -> None:
                answers.append(await c.post(CHAT, json=chat_turn("a b c")))  # 3 tokens: 0.1 s

            inner.start_soon(ask)
            inner.start_soon(ask)
    queued = sorted(float(a.headers["x-queue-ms"]) for a in answers)
    assert queued[0] < 50 < queued[1]


async def test_the_cli_takes_the_cache_model_options() -> None:
    command = [sys.executable, str(SCRIPT), "--count", "1", "--cache-blocks", "8"]
    command += ["--block-tokens", "2", "--prefill-ms-per-token", "0", "--decode-ms-per-token", "0"]
    command += ["--prefill-slots", "2", "--slots", "3"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(run, check=False))
            assert process.stdout is not None
            async with process.stdout:
                [port] = json.loads(await read_line(process.stdout))["listening"]
                async with httpx.AsyncClient() as c:
                    url = f"http://127.0.0.1:{port}{CHAT}"
                    answers = [await c.post(url, json=chat_turn("a b c d e")) for _ in "12"]
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
    assert [a.headers["x-cached-tokens"] for a in answers] == ["0", "4"]
    with trio.fail_after(30):
        bad = await trio.run_process(
            [sys.executable, str(SCRIPT), "--cache-blocks", "8", "--slots", "0"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert bad.returncode == 2
    assert b"slots >= 1" in bad.stderr
