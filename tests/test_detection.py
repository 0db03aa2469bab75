"""Detection: what probing a worker reports (runtime, models, labels, scheme, protocol).

HTTP workers are faked with ``httpx.MockTransport``; connection failures and the gRPC (HTTP/2
preface) probe use real sockets on OS-chosen ports.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from actors.core.errors import DetectionError
from actors.core.model import ConnectionMode, Detection, ModelCard, Runtime, WorkerSpec
from actors.core.urls import parse_worker_url
from actors.registry.detection import Detector, GatewayLoop, probe_http2

# ---- HTTP workers behind a MockTransport ---------------------------------------------------

Route = tuple[int, object]  # (status, JSON body) or (status, raw bytes)
HEALTHY: Route = (200, b"")  # SGLang answers /health with an empty 200
NOT_FOUND: Route = (404, {"detail": "Not Found"})

SGLANG_SERVER_INFO = {
    "model_path": "meta-llama/Llama-3.1-8B-Instruct",
    "tp_size": 1,
    "dp_size": 2,
    "disable_radix_cache": False,
    "host": "0.0.0.0",
    "port": 30000,
    "version": "0.4.6",
    "internal_states": [{"last_gen_throughput": 12.5}],
}
SGLANG_MODEL_INFO = {
    "model_path": "meta-llama/Llama-3.1-8B-Instruct",
    "is_generation": True,
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
}


def model_list(*ids: str, owned_by: str | None = None) -> Route:
    entries: list[dict[str, object]] = []
    for model_id in ids:
        entry: dict[str, object] = {"id": model_id, "object": "model", "created": 0}
        if owned_by is not None:
            entry["owned_by"] = owned_by
        entries.append(entry)
    return 200, {"object": "list", "data": entries}


@dataclass
class FakeHttpWorker:
    """Answers each path from ``routes`` (404 otherwise) and records every request."""

    routes: dict[str, Route]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.routes.get(request.url.path, NOT_FOUND)
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    @property
    def paths(self) -> list[str]:
        return [request.url.path for request in self.requests]


def sglang_worker(**extra: Route) -> FakeHttpWorker:
    routes: dict[str, Route] = {
        "/health": HEALTHY,
        "/v1/models": model_list("llama-8b", owned_by="sglang"),
        "/server_info": (200, SGLANG_SERVER_INFO),
        "/model_info": (200, SGLANG_MODEL_INFO),
    }
    return FakeHttpWorker({**routes, **extra})


def vllm_worker(owned_by: str | None = None) -> FakeHttpWorker:
    return FakeHttpWorker(
        {
            "/health": (200, b""),
            "/v1/models": model_list("qwen-7b", owned_by=owned_by),
            "/version": (200, {"version": "0.8.5"}),
        }
    )


async def detect(
    worker: FakeHttpWorker, url: str = "http://10.0.0.7:8000", **spec: Any
) -> Detection:
    async with httpx.AsyncClient(transport=httpx.MockTransport(worker)) as client:
        return await Detector(client).detect(WorkerSpec(url=parse_worker_url(url), **spec))


async def detection_error(worker: FakeHttpWorker, url: str = "http://10.0.0.7:8000") -> str:
    with pytest.raises(DetectionError) as caught:
        await detect(worker, url)
    return caught.value.message


async def test_an_sglang_worker_is_detected_with_its_server_info_as_labels() -> None:
    worker = sglang_worker()

    detection = await detect(worker)

    assert detection.runtime is Runtime.SGLANG
    assert detection.connection_mode is ConnectionMode.HTTP
    assert detection.url.text == "http://10.0.0.7:8000"
    assert [model.id for model in detection.models] == ["llama-8b"]
    assert detection.labels["tp_size"] == "1"
    assert detection.labels["dp_size"] == "2"
    assert detection.labels["version"] == "0.4.6"
    assert detection.labels["disable_radix_cache"] == "false"
    assert all(isinstance(value, str) for value in detection.labels.values())
    assert "/health" in worker.paths and "/server_info" in worker.paths


async def test_the_model_info_of_an_sglang_worker_lands_on_its_model_card_and_labels() -> None:
    detection = await detect(sglang_worker())

    [card] = detection.models
    assert card.details["architectures"] == ["LlamaForCausalLM"]
    assert card.details["model_type"] == "llama"
    assert card.details["is_generation"] is True
    assert "LlamaForCausalLM" in detection.labels["architectures"]
    assert detection.labels["model_type"] == "llama"


async def test_an_sglang_worker_with_only_the_legacy_get_routes_is_still_detected() -> None:
    worker = sglang_worker(
        **{
            "/v1/models": model_list("llama-8b"),  # no owned_by: only the info routes tell
            "/server_info": NOT_FOUND,
            "/model_info": NOT_FOUND,
            "/get_server_info": (200, SGLANG_SERVER_INFO),
            "/get_model_info": (200, SGLANG_MODEL_INFO),
        }
    )

    detection = await detect(worker)

    assert detection.runtime is Runtime.SGLANG
    assert detection.labels["tp_size"] == "1"
    assert detection.labels["version"] == "0.4.6"
    assert detection.models[0].details["architectures"] == ["LlamaForCausalLM"]
    assert "/get_server_info" in worker.paths and "/get_model_info" in worker.paths


async def test_a_vllm_server_is_detected_by_its_version_route() -> None:
    worker = vllm_worker(owned_by=None)

    detection = await detect(worker)

    assert detection.runtime is Runtime.VLLM
    assert [model.id for model in detection.models] == ["qwen-7b"]
    assert "/version" in worker.paths
    assert "tp_size" not in detection.labels


async def test_a_model_list_owned_by_vllm_names_the_runtime() -> None:
    detection = await detect(vllm_worker(owned_by="vllm"))

    assert detection.runtime is Runtime.VLLM
    assert detection.connection_mode is ConnectionMode.HTTP


async def test_a_server_with_neither_server_info_nor_version_is_an_external_runtime() -> None:
    worker = FakeHttpWorker({"/health": HEALTHY, "/v1/models": model_list("gpt-x", owned_by="me")})

    detection = await detect(worker)

    assert detection.runtime is Runtime.EXTERNAL
    assert [model.id for model in detection.models] == ["gpt-x"]
    assert detection.labels == {}


async def test_a_server_info_route_answering_html_does_not_make_a_worker_sglang() -> None:
    worker = FakeHttpWorker(
        {
            "/health": HEALTHY,
            "/v1/models": model_list("gpt-x"),
            "/server_info": (200, b"<html>a web page</html>"),
            "/get_server_info": (200, b"<html>a web page</html>"),
        }
    )

    detection = await detect(worker)

    assert detection.runtime is Runtime.EXTERNAL
    assert detection.labels == {}


async def test_a_given_model_id_is_used_without_asking_for_the_model_list() -> None:
    worker = vllm_worker(owned_by="vllm")

    detection = await detect(worker, model_id="served-name")

    assert "/v1/models" not in worker.paths
    assert detection.models == (ModelCard(id="served-name"),)
    assert detection.model_ids == frozenset({"served-name"})


async def test_a_given_runtime_is_trusted_without_probing_for_one() -> None:
    worker = sglang_worker(**{"/version": (200, {"version": "0.8.5"})})

    detection = await detect(worker, runtime=Runtime.TRTLLM)

    assert detection.runtime is Runtime.TRTLLM
    probes = {"/server_info", "/get_server_info", "/version"}
    assert probes.isdisjoint(worker.paths)


async def test_a_given_runtime_wins_over_the_owner_in_the_model_list() -> None:
    worker = sglang_worker()

    detection = await detect(worker, runtime=Runtime.VLLM)

    assert detection.runtime is Runtime.VLLM
    assert "/version" not in worker.paths


async def test_an_api_key_is_sent_as_a_bearer_token_on_every_request() -> None:
    worker = vllm_worker(owned_by=None)

    await detect(worker, api_key="sk-secret")

    # /health first; the model list and SGLang's info routes are then asked concurrently
    assert worker.paths[0] == "/health"
    probes = ["/get_server_info", "/server_info", "/v1/models", "/version"]
    assert sorted(worker.paths[1:]) == probes
    assert all(r.headers.get("authorization") == "Bearer sk-secret" for r in worker.requests)


async def test_no_authorization_header_is_sent_without_an_api_key() -> None:
    worker = sglang_worker()

    await detect(worker)

    assert worker.requests
    assert all("authorization" not in request.headers for request in worker.requests)


async def test_an_unhealthy_worker_fails_detection_naming_the_status_it_answered() -> None:
    worker = sglang_worker(**{"/health": (503, {"error": "loading"})})

    message = await detection_error(worker)

    assert "503" in message
    assert "/health" in message
    assert "http://10.0.0.7:8000" in message


async def test_a_model_list_that_answers_an_error_status_fails_detection() -> None:
    worker = sglang_worker(**{"/v1/models": (500, {"error": "boom"})})

    message = await detection_error(worker)

    assert "500" in message
    assert "/v1/models" in message


async def test_an_empty_model_list_fails_detection_saying_no_models() -> None:
    worker = sglang_worker(**{"/v1/models": (200, {"object": "list", "data": []})})

    message = await detection_error(worker)

    assert "no models" in message
    assert "/v1/models" in message


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b"\xff\xfe\x00garbage",
        [],
        {"models": ["m"]},
        {"data": "m"},
        {"data": {"id": "m"}},
        {"data": ["m"]},
        {"data": [{"name": "m"}]},
        {"data": [{"id": 7}]},
        {"data": [{"id": ""}]},
    ],
    ids=repr,
)
async def test_a_model_list_that_is_not_an_openai_list_fails_detection(body: object) -> None:
    worker = sglang_worker(**{"/v1/models": (200, body)})

    message = await detection_error(worker)

    assert "/v1/models" in message


async def test_a_bare_address_is_probed_over_http_and_gets_the_http_scheme() -> None:
    worker = sglang_worker()

    detection = await detect(worker, url="127.0.0.1:9")

    assert str(worker.requests[0].url) == "http://127.0.0.1:9/health"
    assert all(request.url.scheme == "http" for request in worker.requests)
    assert detection.url.scheme == "http"
    assert detection.url.text == "http://127.0.0.1:9"
    assert detection.connection_mode is ConnectionMode.HTTP


async def test_an_https_address_keeps_its_scheme() -> None:
    worker = sglang_worker()

    detection = await detect(worker, url="https://worker.example")

    assert str(worker.requests[0].url) == "https://worker.example/health"
    assert detection.url.text == "https://worker.example:443"
    assert detection.connection_mode is ConnectionMode.HTTP


async def test_a_worker_serving_several_models_keeps_them_in_order() -> None:
    worker = vllm_worker()
    worker.routes["/v1/models"] = model_list("zeta", "alpha", "mu", owned_by="vllm")

    detection = await detect(worker)

    assert [model.id for model in detection.models] == ["zeta", "alpha", "mu"]
    assert detection.model_ids == frozenset({"zeta", "alpha", "mu"})


# ---- real sockets: refused connections and the gRPC (HTTP/2 preface) probe ----------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GOAWAY_LIKE = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + bytes(8)
Handler = Callable[[trio.SocketStream], Awaitable[None]]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once by us, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    )
    return int(listeners[0].socket.getsockname()[1])


async def receive_until(
    stream: trio.SocketStream, data: bytes, done: Callable[[bytes], bool]
) -> bytes:
    while not done(data):
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class FakeGrpcServer:
    """Answers the HTTP/2 preface with ``preface_answer``; anything else gets a binary frame.

    ``seen`` records each connection: ``"h2 preface"`` or the first line of what was sent.
    With ``reset_other`` a non-preface connection is reset (RST) instead of answered.
    """

    preface_answer: bytes = H2_SETTINGS
    reset_other: bool = False
    seen: list[str] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                data = await receive_until(stream, b"", lambda d: len(d) >= len(H2_PREFACE))
                if data.startswith(H2_PREFACE):
                    self.seen.append("h2 preface")
                    await stream.send_all(self.preface_answer)
                else:
                    data = await receive_until(stream, data, lambda d: b"\r\n\r\n" in d)
                    self.seen.append(data.split(b"\r\n")[0].decode(errors="replace"))
                    if self.reset_other:
                        linger = struct.pack("ii", 1, 0)
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        return
                    await stream.send_all(GOAWAY_LIKE)
                    await stream.send_eof()
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass


async def detect_real(url: str, **spec: Any) -> Detection:
    with trio.fail_after(5):
        async with httpx.AsyncClient(trust_env=False) as client:
            return await Detector(client).detect(WorkerSpec(url=parse_worker_url(url), **spec))


async def detect_real_error(url: str, **spec: Any) -> str:
    with pytest.raises(DetectionError) as caught:
        await detect_real(url, **spec)
    return caught.value.message


@pytest.mark.parametrize("scheme", ["http://", "", "grpc://"], ids=["http", "bare", "grpc"])
async def test_a_refused_connection_fails_detection_saying_connection_refused(scheme: str) -> None:
    port = closed_port()

    message = await detect_real_error(f"{scheme}127.0.0.1:{port}", model_id="m")

    assert "connection refused" in message
    assert f"127.0.0.1:{port}" in message


async def test_the_http2_probe_reports_a_refused_connection() -> None:
    port = closed_port()

    with trio.fail_after(5), pytest.raises(DetectionError, match="connection refused"):
        await probe_http2(parse_worker_url(f"grpc://127.0.0.1:{port}"))


async def test_the_http2_probe_accepts_a_peer_that_answers_settings(nursery: trio.Nursery) -> None:
    server = FakeGrpcServer()
    port = await serve(nursery, server.handle)

    with trio.fail_after(5):
        await probe_http2(parse_worker_url(f"grpc://127.0.0.1:{port}"))

    assert server.seen == ["h2 preface"]


async def test_a_grpc_address_is_detected_when_the_peer_answers_the_preface_with_settings(
    nursery: trio.Nursery,
) -> None:
    server = FakeGrpcServer()
    port = await serve(nursery, server.handle)

    detection = await detect_real(f"grpc://127.0.0.1:{port}", model_id="llama-8b")

    assert detection.connection_mode is ConnectionMode.GRPC
    assert detection.url.scheme == "grpc"
    assert detection.url.text == f"grpc://127.0.0.1:{port}"
    assert detection.models == (ModelCard(id="llama-8b"),)
    assert server.seen == ["h2 preface"]  # no HTTP/1.1 request was tried


async def test_a_grpc_worker_keeps_the_runtime_it_was_given(nursery: trio.Nursery) -> None:
    server = FakeGrpcServer()
    port = await serve(nursery, server.handle)

    detection = await detect_real(f"grpc://127.0.0.1:{port}", model_id="m", runtime=Runtime.VLLM)

    assert detection.runtime is Runtime.VLLM
    assert detection.connection_mode is ConnectionMode.GRPC


async def test_a_bare_address_that_does_not_speak_http1_is_registered_as_grpc(
    nursery: trio.Nursery,
) -> None:
    server = FakeGrpcServer()
    port = await serve(nursery, server.handle)

    detection = await detect_real(f"127.0.0.1:{port}", model_id="llama-8b")

    assert server.seen == ["GET /health HTTP/1.1", "h2 preface"]
    assert detection.connection_mode is ConnectionMode.GRPC
    assert detection.url.text == f"grpc://127.0.0.1:{port}"
    assert detection.models == (ModelCard(id="llama-8b"),)


async def test_a_bare_address_whose_peer_resets_the_http1_request_is_probed_as_grpc(
    nursery: trio.Nursery,
) -> None:
    server = FakeGrpcServer(reset_other=True)  # a gRPC server hanging up on a bogus greeting
    port = await serve(nursery, server.handle)

    detection = await detect_real(f"127.0.0.1:{port}", model_id="llama-8b")

    assert detection.connection_mode is ConnectionMode.GRPC
    assert detection.url.text == f"grpc://127.0.0.1:{port}"


async def test_an_explicit_http_address_that_answers_binary_is_not_retried_as_grpc(
    nursery: trio.Nursery,
) -> None:
    server = FakeGrpcServer()
    port = await serve(nursery, server.handle)

    message = await detect_real_error(f"http://127.0.0.1:{port}", model_id="m")

    assert "does not speak HTTP/1.1" in message
    assert f"http://127.0.0.1:{port}" in message
    assert server.seen == ["GET /health HTTP/1.1"]


async def test_a_grpc_peer_answering_the_preface_with_another_frame_fails_detection(
    nursery: trio.Nursery,
) -> None:
    server = FakeGrpcServer(preface_answer=GOAWAY_LIKE)
    port = await serve(nursery, server.handle)

    message = await detect_real_error(f"grpc://127.0.0.1:{port}", model_id="m")

    assert "SETTINGS" in message
    assert f"grpc://127.0.0.1:{port}" in message


async def test_an_http1_server_at_a_grpc_address_fails_detection(nursery: trio.Nursery) -> None:
    async def http1_server(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await receive_until(stream, b"", lambda d: b"\r\n\r\n" in d)
                await stream.send_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await stream.send_eof()
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass

    port = await serve(nursery, http1_server)

    message = await detect_real_error(f"grpc://127.0.0.1:{port}", model_id="m")

    assert f"grpc://127.0.0.1:{port}" in message


async def test_a_grpc_peer_that_closes_at_once_fails_detection(nursery: trio.Nursery) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    port = await serve(nursery, hang_up)

    message = await detect_real_error(f"grpc://127.0.0.1:{port}", model_id="m")

    assert f"grpc://127.0.0.1:{port}" in message


async def test_a_bare_address_that_speaks_neither_protocol_fails_naming_both(
    nursery: trio.Nursery,
) -> None:
    server = FakeGrpcServer(preface_answer=GOAWAY_LIKE)
    port = await serve(nursery, server.handle)

    message = await detect_real_error(f"127.0.0.1:{port}", model_id="m")

    assert "HTTP/1.1" in message
    assert "gRPC" in message
    assert f"127.0.0.1:{port}" in message
    assert server.seen == ["GET /health HTTP/1.1", "h2 preface"]


def test_the_reason_of_an_error_whose_context_chain_loops_is_found_and_terminates() -> None:
    from actors.registry.detection import _reason

    refused = ConnectionRefusedError(111, "Connection refused")
    group = BaseExceptionGroup("probes", [refused])
    refused.__context__ = group  # a loop, as concurrent probes can leave behind
    wrapper = RuntimeError("all attempts failed")
    wrapper.__cause__ = group
    assert _reason(wrapper) == "connection refused"


# ---- loops: an address that answers as this gateway itself ---------------------------------

OUR_ID = "0123456789abcdef"


@dataclass
class MarkedWorker:
    """A worker (or a gateway) whose answers carry ``x-tmg-gateway: <mark>`` on ``marked``."""

    inner: FakeHttpWorker
    mark: str
    marked: frozenset[str] = frozenset({"/v1/models"})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        response = self.inner(request)
        if request.url.path in self.marked:
            response.headers["x-tmg-gateway"] = self.mark
        return response


def gateway_like(
    mark: str, *models: str, marked: frozenset[str] = frozenset({"/v1/models"})
) -> MarkedWorker:
    """Answers as a tmg gateway does: /health, and /v1/models listing its ready workers' models."""
    routes: dict[str, Route] = {"/health": (200, b"OK"), "/v1/models": model_list(*models)}
    return MarkedWorker(FakeHttpWorker(routes), mark, marked)


async def detect_as_us(worker: MarkedWorker, **spec: Any) -> Detection:
    async with httpx.AsyncClient(transport=httpx.MockTransport(worker)) as client:
        detector = Detector(client, instance_id=OUR_ID)
        return await detector.detect(WorkerSpec(url=parse_worker_url("127.0.0.1:30000"), **spec))


async def test_an_address_answering_with_our_own_gateway_id_fails_at_once_as_a_loop() -> None:
    ourselves = gateway_like(OUR_ID, "llama-8b")

    with pytest.raises(GatewayLoop) as caught:
        await detect_as_us(ourselves)

    error = caught.value
    assert isinstance(error, DetectionError)
    assert "this gateway itself" in error.message and "loop" in error.message
    assert "127.0.0.1:30000" in error.message
    assert error.retryable is False and DetectionError("x").code != error.code
    assert ourselves.inner.paths.count("/v1/models") == 1


async def test_our_gateway_with_no_ready_workers_is_still_a_loop_not_an_empty_model_list() -> None:
    ourselves = gateway_like(OUR_ID)  # /v1/models answers an empty list

    with pytest.raises(GatewayLoop):
        await detect_as_us(ourselves)


async def test_our_id_on_a_failing_answer_is_a_loop_too() -> None:
    ourselves = gateway_like(OUR_ID, "m", marked=frozenset({"/health"}))
    ourselves.inner.routes["/health"] = (503, {"error": "not ready"})

    with pytest.raises(GatewayLoop):
        await detect_as_us(ourselves)

    assert ourselves.inner.paths == ["/health"]  # nothing asked after the loop showed


async def test_our_id_on_the_health_answer_stops_detection_before_the_model_list() -> None:
    ourselves = gateway_like(OUR_ID, "m", marked=frozenset({"/health", "/v1/models"}))

    with pytest.raises(GatewayLoop):
        await detect_as_us(ourselves, model_id="m")  # a given model id: no /v1/models needed

    assert ourselves.inner.paths == ["/health"]


async def test_another_tmg_gateway_is_a_legitimate_worker() -> None:
    upstream = gateway_like("fedcba9876543210", "llama-8b", "qwen-7b")

    detection = await detect_as_us(upstream)

    assert [model.id for model in detection.models] == ["llama-8b", "qwen-7b"]
    assert detection.connection_mode is ConnectionMode.HTTP


@pytest.mark.parametrize("mark", ["", OUR_ID.upper(), OUR_ID + "0", OUR_ID[:-1]])
async def test_only_exactly_our_id_is_a_loop(mark: str) -> None:
    detection = await detect_as_us(gateway_like(mark, "m"))

    assert [model.id for model in detection.models] == ["m"]


async def test_a_detector_without_an_instance_id_never_reports_a_loop() -> None:
    ourselves = gateway_like(OUR_ID, "m")
    async with httpx.AsyncClient(transport=httpx.MockTransport(ourselves)) as client:
        detection = await Detector(client).detect(
            WorkerSpec(url=parse_worker_url("127.0.0.1:30000"))
        )

    assert [model.id for model in detection.models] == ["m"]


async def test_a_loop_is_seen_on_real_sockets(nursery: trio.Nursery) -> None:
    seen: list[str] = []

    async def answer_as_us(stream: trio.SocketStream) -> None:
        async with stream:
            head = await receive_until(stream, b"", lambda data: b"\r\n\r\n" in data)
            path = head.split(b" ")[1].decode()
            seen.append(path)
            body = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"X-TMG-Gateway: " + OUR_ID.encode() + b"\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )

    port = await serve(nursery, answer_as_us)

    with trio.fail_after(5), pytest.raises(GatewayLoop, match="this gateway itself"):
        async with httpx.AsyncClient(trust_env=False) as client:
            detector = Detector(client, instance_id=OUR_ID)
            await detector.detect(WorkerSpec(url=parse_worker_url(f"http://127.0.0.1:{port}")))

    assert seen == ["/health"]
