"""Detection: probe a worker and report what it is. Knows nothing of the registry.

HTTP workers: ``GET /health`` must answer 2xx; ``GET /v1/models`` lists the models (``owned_by``
names the runtime); SGLang answers ``/server_info`` (or ``/get_server_info``) and ``/model_info``
(or ``/get_model_info``); vLLM answers ``/version``. A ``grpc://`` address, or a bare address that
does not speak HTTP/1.1, is probed with the HTTP/2 client preface and must answer SETTINGS.
Every failure raises DetectionError with a sentence an operator can act on.

Loops: a tmg gateway marks its answers with ``x-tmg-gateway: <instance id>``. An answer that
carries this gateway's own id means the address is this gateway itself; detection then fails at
once with ``GatewayLoop``, whose ``retryable`` is False (no further attempt can answer otherwise).
Another gateway's id is fine: chaining gateways is legitimate.
"""

from __future__ import annotations

import errno
import json
import ssl
from collections.abc import Awaitable
from typing import Any, ClassVar, Protocol

import httpx
import trio

from actors.core.errors import DetectionError
from actors.core.model import ConnectionMode, Detection, ModelCard, Runtime, WorkerSpec
from actors.core.urls import WorkerUrl

GATEWAY_HEADER = "x-tmg-gateway"  # a tmg gateway's instance id, on its answers
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS frame, stream 0
_INFO_KEYS_SKIPPED = {"host", "port", "internal_states"}
_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


class GatewayLoop(DetectionError):
    """The address answered as this gateway itself: registering it would make a loop."""

    code = "LOOP_DETECTED"
    retryable: ClassVar[bool] = False  # the registrar stops at once instead of retrying


class _NotHttp(Exception):
    """The peer accepted a connection but did not answer like an HTTP/1.1 server."""


class Probe(Protocol):
    """What the registrar needs from detection (tests and embedders may bring their own)."""

    async def detect(self, spec: WorkerSpec) -> Detection: ...

    async def check_health(self, spec: WorkerSpec, url: WorkerUrl) -> str | None:
        """None when the worker at ``url`` is healthy, else why not."""
        ...


class Detector:
    """Probes workers with one shared httpx client (control plane only, never the hot path)."""

    def __init__(self, client: httpx.AsyncClient, *, instance_id: str | None = None) -> None:
        self._client = client
        self._instance_id = instance_id  # this gateway's: a worker answering with it is a loop

    async def detect(self, spec: WorkerSpec) -> Detection:
        """Probe ``spec``'s worker once. The caller bounds the time (``trio.fail_after``)."""
        url = spec.url
        if url.is_grpc:
            return await self._detect_grpc(spec, url)
        if url.scheme is not None:
            try:
                return await self._detect_http(spec, url)
            except _NotHttp as error:
                raise DetectionError(f"{url.text} does not speak HTTP/1.1: {error}") from None
        try:
            return await self._detect_http(spec, url.with_scheme("http"))
        except _NotHttp as http_error:
            try:
                return await self._detect_grpc(spec, url.with_scheme("grpc"))
            except DetectionError as grpc_error:
                raise DetectionError(
                    f"{url.text} speaks neither HTTP/1.1 ({http_error}) nor gRPC ({grpc_error})"
                ) from None

    async def check_health(self, spec: WorkerSpec, url: WorkerUrl) -> str | None:
        """One health probe of a registered worker: None when healthy, else the reason."""
        try:
            if url.is_grpc:
                await probe_http2(url)
                return None
            headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
            response = await self._client.get(f"{url.text}/health", headers=headers)
        except DetectionError as error:
            return error.message
        except httpx.HTTPError as error:
            return f"GET {url.text}/health: {_reason(error)}"
        if response.is_success:
            return None
        return f"GET {url.text}/health answered {response.status_code}"

    # ---- HTTP --------------------------------------------------------------------------

    async def _detect_http(self, spec: WorkerSpec, url: WorkerUrl) -> Detection:
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}

        async def get(path: str) -> httpx.Response:
            target = f"{url.text}{path}"
            try:
                response = await self._client.get(target, headers=headers)
            except httpx.ConnectError as error:
                raise DetectionError(f"GET {target}: cannot connect ({_reason(error)})") from None
            except httpx.TimeoutException:
                raise DetectionError(f"GET {target}: no answer in time") from None
            except (httpx.RemoteProtocolError, httpx.LocalProtocolError) as error:
                raise _NotHttp(_reason(error)) from None
            except (httpx.ReadError, httpx.WriteError) as error:  # e.g. an h2-only peer resets
                raise _NotHttp(_reason(error)) from None
            except httpx.HTTPError as error:
                raise DetectionError(f"GET {target}: {_reason(error)}") from None
            self._refuse_ourselves(url, response)
            return response

        health = await get("/health")
        if not health.is_success:
            raise DetectionError(f"GET {url.text}/health answered {health.status_code}")

        # the model list and SGLang's info routes are independent: ask them at once
        listing: list[httpx.Response] = []
        info: list[dict[str, Any] | None] = []

        async def sglang_info() -> None:
            server_info = await _first_json(get, "/server_info", "/get_server_info")
            model_info = None
            if server_info is not None:
                model_info = await _first_json(get, "/model_info", "/get_model_info")
            info.extend((server_info, model_info))

        try:
            async with trio.open_nursery() as nursery:
                if spec.model_id is None:
                    nursery.start_soon(_append, listing, get("/v1/models"))
                if spec.runtime in (None, Runtime.SGLANG):
                    nursery.start_soon(sglang_info)
        except BaseExceptionGroup as group:
            probe_errors, others = group.split((DetectionError, _NotHttp))
            if others is not None or probe_errors is None:
                raise  # a cancellation (or a bug) propagates untouched
            loops = probe_errors.subgroup(GatewayLoop)  # the one error no retry can change
            raise _first_leaf(loops or probe_errors) from None

        owner: str | None = None
        if spec.model_id is not None:
            models = [ModelCard(id=spec.model_id)]
        else:
            if not listing[0].is_success:
                status = listing[0].status_code
                raise DetectionError(f"GET {url.text}/v1/models answered {status}")
            models, owner = _parse_models(listing[0], url)

        labels: dict[str, str] = {}
        runtime = spec.runtime or _runtime_from_owner(owner)
        server_info, model_info = info or (None, None)
        if runtime in (None, Runtime.SGLANG) and server_info is not None:
            runtime = runtime or Runtime.SGLANG
            labels.update(_labels(server_info))
            if model_info is not None:
                labels.update(_labels(model_info))
                models = [_with_details(models[0], model_info), *models[1:]]
        if runtime is None:
            version = await _first_json(get, "/version")
            runtime = Runtime.VLLM if version is not None else Runtime.EXTERNAL
        return Detection(
            url=url,
            connection_mode=ConnectionMode.HTTP,
            runtime=runtime,
            models=tuple(models),
            labels=labels,
        )

    def _refuse_ourselves(self, url: WorkerUrl, response: httpx.Response) -> None:
        """GatewayLoop when ``response`` comes from this very gateway (our instance id)."""
        if self._instance_id is None:
            return
        if response.headers.get(GATEWAY_HEADER, "").strip() == self._instance_id:
            raise GatewayLoop(
                f"{url.text} is this gateway itself (its answer carries our {GATEWAY_HEADER} "
                f"id {self._instance_id}): registering it would make every request it gets "
                "come back here in a loop; give the address of a worker"
            )

    # ---- gRPC --------------------------------------------------------------------------

    async def _detect_grpc(self, spec: WorkerSpec, url: WorkerUrl) -> Detection:
        await probe_http2(url)
        models = (ModelCard(id=spec.model_id),) if spec.model_id else ()
        return Detection(
            url=url,
            connection_mode=ConnectionMode.GRPC,
            runtime=spec.runtime or Runtime.SGLANG,
            models=models,
        )


async def probe_http2(url: WorkerUrl) -> None:
    """Send the HTTP/2 client preface; the peer must answer with a SETTINGS frame."""
    target = url.text
    try:
        tcp = await trio.open_tcp_stream(url.host, url.port)
        stream: trio.abc.Stream = tcp
        if url.is_tls:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["h2"])
            stream = trio.SSLStream(tcp, context, server_hostname=url.host)
        async with stream:
            await stream.send_all(H2_PREFACE + H2_SETTINGS)
            head = b""
            while len(head) < 9:
                chunk = await stream.receive_some(9 - len(head))
                if not chunk:
                    raise DetectionError(f"{target} closed the connection after the preface")
                head += chunk
    except OSError as error:
        raise DetectionError(f"{target}: cannot connect ({_reason(error)})") from None
    except (trio.BrokenResourceError, ssl.SSLError) as error:
        raise DetectionError(f"{target}: connection failed ({_reason(error)})") from None
    if head[3] != 0x04:
        raise DetectionError(f"{target} did not answer the HTTP/2 preface with SETTINGS")


# ---- parsing helpers -------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """A short cause: "connection refused" and the like when the chain of errors says so."""
    todo: list[BaseException] = [error]
    visited: set[int] = set()  # chains can loop (a context that holds its own group)
    while todo:
        current = todo.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if isinstance(current, OSError) and current.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[current.errno]
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    text = str(error) or type(error).__name__
    return "connection refused" if "refused" in text.lower() else text


def _parse_models(response: httpx.Response, url: WorkerUrl) -> tuple[list[ModelCard], str | None]:
    try:
        data = response.json().get("data")
        ids = [entry["id"] for entry in data]
        owners = [entry.get("owned_by") for entry in data]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise DetectionError(
            f"GET {url.text}/v1/models did not answer an OpenAI model list"
        ) from None
    if not ids or not all(isinstance(model_id, str) and model_id for model_id in ids):
        raise DetectionError(f"no models reported by GET {url.text}/v1/models")
    details = [{k: v for k, v in entry.items() if k not in ("id", "object")} for entry in data]
    owner = owners[0] if owners and isinstance(owners[0], str) else None
    return [ModelCard(id=i, details=d) for i, d in zip(ids, details, strict=True)], owner


async def _append(into: list[httpx.Response], answer: Awaitable[httpx.Response]) -> None:
    into.append(await answer)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error in a (possibly nested) group from concurrent probes."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _runtime_from_owner(owner: str | None) -> Runtime | None:
    try:
        return Runtime((owner or "").lower())
    except ValueError:
        return None


async def _first_json(get: Any, *paths: str) -> dict[str, Any] | None:
    """The JSON object answered by the first of ``paths`` that answers 200 with one."""
    for path in paths:
        response = await get(path)
        if response.status_code != 200:
            continue
        try:
            body = response.json()
        except ValueError:
            continue
        if isinstance(body, dict):
            return body
    return None


def _labels(info: dict[str, Any]) -> dict[str, str]:
    labels = {}
    for key, value in info.items():
        if key in _INFO_KEYS_SKIPPED or value is None:
            continue
        if isinstance(value, bool):
            labels[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            labels[key] = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            labels[key] = json.dumps(value)
    return labels


def _with_details(card: ModelCard, model_info: dict[str, Any]) -> ModelCard:
    extra: dict[str, Any] = {
        k: model_info[k]
        for k in ("model_type", "architectures", "is_generation")
        if k in model_info
    }
    return ModelCard(id=card.id, details={**card.details, **extra})
