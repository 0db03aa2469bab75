#!/usr/bin/env python3
"""A fast fake of SGLang / vLLM inference servers (and of a gRPC-only port), for tests and load.

One trio process serves many ports, each an independent FakeWorker with its own config copy and
counters; HTTP/1.1 is spoken with h11 directly (keep-alive, chunked SSE). CLI: see ``--help``.

**Cache model** (``--cache-blocks N``, off by default): each port then keeps a prefix cache of
token blocks (``scripts/fake_cache.py``: words are tokens, ``--block-tokens`` per block, LRU at
N blocks) and serves chat and text completions like an inference engine, on trio's clock:

* at most ``--slots`` requests in service; later ones wait in FIFO order;
* a request in service waits for one of ``--prefill-slots`` prefill units (FIFO), then looks its
  prompt up (chat: the messages' contents joined by spaces; else ``prompt``) and prefills the
  uncached tokens at ``--prefill-ms-per-token`` each; its whole blocks are then inserted;
* then it decodes ``max_tokens`` tokens at ``--decode-ms-per-token`` each: a stream sends its
  first chunk right after the prefill (time to first token = queue + prefill) and one chunk per
  decode step; a plain answer comes after the last step. It keeps its slot until it is sent.

Answers then carry ``x-prompt-tokens``, ``x-cached-tokens``, ``x-queue-ms`` (waiting for a slot
and a prefill unit) and ``x-prefill-ms``; every answer carries ``x-fake-worker-port``. Errors (a
bad body, an unknown model) are answered at once, outside the model.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from functools import partial

import h11
import trio

if __package__ in (None, ""):  # run as a file: make the project root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import fake_payloads as payloads
from scripts.fake_cache import PrefixCache, ServiceTimes, look_up, prompt_text
from scripts.fake_http import RECV_SIZE, linger, next_event, send_events, send_reply
from scripts.fake_payloads import Refused, Reply, error_reply, json_reply

MAX_BODY = 8 * 1024 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, flags 0, stream 0
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"  # same, flags ACK
H2_GOAWAY = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x01"
INFERENCE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate"})
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
MODELLED = frozenset({"/v1/chat/completions", "/v1/completions"})  # routes the cache model serves


@dataclass(kw_only=True)
class FakeWorkerConfig:
    model: str = "fake-model"
    flavor: str = "sglang"  # "sglang" | "vllm" | "grpc"
    latency: float = 0.0  # seconds added before answering inference routes
    token_delay: float = 0.0  # seconds between SSE chunks
    fail_health: bool = False  # /health answers 503
    startup_delay: float = 0.0  # every route answers 503 {"error": "loading"} for this long
    die_after: int | None = None  # after this many requests the port stops serving
    big_answer_bytes: int | None = None  # plain chat completions padded to this many bytes
    host: str = "127.0.0.1"
    # the cache model (module docstring): on when cache_blocks is set (0: it caches nothing)
    cache_blocks: int | None = None
    block_tokens: int = 16
    prefill_ms_per_token: float = 1.0
    decode_ms_per_token: float = 20.0
    prefill_slots: int = 1
    slots: int = 4

    def __post_init__(self) -> None:
        if self.cache_blocks is not None and not (
            self.cache_blocks >= 0
            and self.block_tokens >= 1
            and self.prefill_ms_per_token >= 0
            and self.decode_ms_per_token >= 0
            and self.prefill_slots >= 1
            and self.slots >= 1
        ):
            raise ValueError(
                "cache model: cache_blocks >= 0, block_tokens >= 1, per-token times >= 0, "
                "prefill_slots >= 1 and slots >= 1"
            )


@dataclass(frozen=True, slots=True)
class Admission:
    """A request in service: its prompt's token counts and how long it waited and prefilled."""

    prompt_tokens: int
    cached_tokens: int
    queue_secs: float
    prefill_secs: float

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return (
            (b"x-prompt-tokens", str(self.prompt_tokens).encode()),
            (b"x-cached-tokens", str(self.cached_tokens).encode()),
            (b"x-queue-ms", f"{self.queue_secs * 1000:.1f}".encode()),
            (b"x-prefill-ms", f"{self.prefill_secs * 1000:.1f}".encode()),
        )


class CacheSimulator:
    """One port's engine model on trio's clock: slots, prefill units and the prefix cache.

    trio's semaphores hand a released unit to the longest waiter, so both queues are FIFO."""

    def __init__(self, config: FakeWorkerConfig) -> None:
        self.cache = PrefixCache(config.cache_blocks or 0)
        self.block_tokens = config.block_tokens
        self.times = ServiceTimes(
            prefill_ms_per_token=config.prefill_ms_per_token,
            decode_ms_per_token=config.decode_ms_per_token,
        )
        self._slots = trio.Semaphore(config.slots)
        self._prefill = trio.Semaphore(config.prefill_slots)
        self.waiting = 0  # for a slot or a prefill unit
        self.running = 0  # holding a slot
        self.prompt_tokens = 0
        self.cached_tokens = 0

    @asynccontextmanager
    async def admit(self, text: str) -> AsyncIterator[Admission]:
        """Wait for a slot and a prefill unit, prefill, insert the prompt's blocks; the slot is
        held until the block exits."""
        arrived = trio.current_time()
        waiting = True
        self.waiting += 1
        try:
            async with self._slots:
                self.running += 1
                try:
                    async with self._prefill:
                        self.waiting -= 1
                        waiting = False
                        queued = trio.current_time() - arrived
                        lookup = look_up(self.cache, text, self.block_tokens)
                        prefill = self.times.prefill_secs(lookup.uncached_tokens)
                        await trio.sleep(prefill)
                        self.cache.insert(lookup.hashes)
                    self.prompt_tokens += lookup.prompt_tokens
                    self.cached_tokens += lookup.cached_tokens
                    yield Admission(lookup.prompt_tokens, lookup.cached_tokens, queued, prefill)
                finally:
                    self.running -= 1
        finally:
            if waiting:  # cancelled (the client left) before its prefill began
                self.waiting -= 1

    def stats(self) -> dict[str, int]:
        return {
            "blocks": len(self.cache),
            "evictions": self.cache.evictions,
            "waiting": self.waiting,
            "running": self.running,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }


def modelled_request(body: bytes) -> tuple[str, int] | None:
    """The prompt text and max_tokens (default 8) of a completion body; None if it has none."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    text = prompt_text(request)
    if text is None or not isinstance(request, dict):
        return None
    n = request.get("max_tokens", request.get("max_completion_tokens"))
    n = 8 if n is None else n
    return (text, n) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


class FakeWorker:
    """One port's fake server. Tests may mutate ``config`` while it runs (same trio thread)."""

    def __init__(
        self, config: FakeWorkerConfig, listeners: list[trio.SocketListener], log: bool = False
    ) -> None:
        self.config = config
        self.port: int = int(listeners[0].socket.getsockname()[1])
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.log = log
        self.started_at = trio.current_time()
        self.created = int(time.time())
        self._listeners = listeners
        self._scope = trio.CancelScope()
        self.simulator = CacheSimulator(config) if config.cache_blocks is not None else None
        self._send_reply = partial(  # token_delay is read per SSE chunk: tests may change it
            send_reply,
            port_header=str(self.port).encode(),
            token_delay=lambda: self.config.token_delay,
        )

    def close_listeners(self) -> None:
        for listener in self._listeners:
            listener.socket.close()

    async def serve(self) -> None:
        """Serve until cancelled or until ``die_after`` requests were answered."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for listener in self._listeners:
                        nursery.start_soon(self._accept, listener, nursery)
        finally:
            self.close_listeners()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY:
                    raise
                await trio.sleep(0.1)  # out of file descriptors: wait, as trio.serve_tcp does
            else:
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            if self.config.flavor == "grpc":
                await self._serve_h2(stream)
            else:
                await self._serve_http(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the peer hung up, or broke HTTP in a way we could not even answer
        finally:
            await trio.aclose_forcefully(stream)

    def _count(self, key: str) -> bool:
        """Count a request; True when it is the last one this port answers (die_after)."""
        self.requests += 1
        self.counts[key] += 1
        if self.config.die_after is not None and self.requests >= self.config.die_after:
            self.close_listeners()  # right away, so new connects are refused from now on
            return True
        return False

    def _log(self, what: str, status: int) -> None:
        if self.log:
            print(f"port={self.port} {what} -> {status}", flush=True)

    async def _serve_h2(self, stream: trio.SocketStream) -> None:
        buf = b""
        while len(buf) < len(H2_PREFACE) and H2_PREFACE.startswith(buf):
            if not (data := await stream.receive_some(RECV_SIZE)):
                return
            buf += data
        ok = buf.startswith(H2_PREFACE)
        dying = self._count("h2 preface" if ok else "h2 not-a-preface")
        self._log("PRI * HTTP/2.0" if ok else "non-HTTP/2 bytes", 200 if ok else 400)
        if ok:
            await stream.send_all(H2_SETTINGS + H2_SETTINGS_ACK)
            while not dying and await stream.receive_some(RECV_SIZE):
                pass
        else:
            await stream.send_all(H2_GOAWAY)
            await linger(stream)
        if dying:
            self._scope.cancel()

    async def _serve_http(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while isinstance(request := await next_event(conn, stream), h11.Request):
                body: bytearray | None = bytearray()
                if any(k == b"content-length" and int(v) > MAX_BODY for k, v in request.headers):
                    body = None
                elif conn.client_is_waiting_for_100_continue:
                    await stream.send_all(send_events(conn, _CONTINUE))
                while body is not None:
                    event = await next_event(conn, stream)
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if not isinstance(event, h11.Data):
                        return
                    body += event.data
                    body = None if len(body) > MAX_BODY else body
                method = request.method.decode("ascii")
                path = request.target.partition(b"?")[0].decode("latin-1")
                dying = self._count(f"{method} {path}")
                await self._answer(conn, stream, method, path, body, close=dying or body is None)
                if dying:
                    self._scope.cancel()  # closes every connection of this port
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    await linger(stream)
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reply = error_reply(exc.error_status_hint, f"bad request: {exc}")
                await self._send_reply(conn, stream, reply, close=True)
                await linger(stream)

    async def _answer(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        method: str,
        path: str,
        body: bytearray | None,
        *,
        close: bool,
    ) -> None:
        reply = await self._reply("GET" if method == "HEAD" else method, path, body)
        reply = Reply(reply.status) if method == "HEAD" else reply  # h11: no body
        self._log(f"{method} {path}", reply.status)
        sim = self.simulator
        modelled = None
        if sim is not None and reply.status == 200 and method == "POST" and path in MODELLED:
            modelled = modelled_request(bytes(body or b""))
        if sim is None or modelled is None:
            await self._send_reply(conn, stream, reply, close=close)
            return
        text, max_tokens = modelled
        decode = sim.times.decode_ms_per_token / 1000
        async with sim.admit(text) as admission:
            reply = reply._replace(headers=reply.headers + admission.headers())
            if reply.sse is None:
                await trio.sleep(sim.times.decode_secs(max_tokens))
            await self._send_reply(conn, stream, reply, close=close, token_delay=lambda: decode)

    # ---- routes ----

    async def _reply(self, method: str, path: str, body: bytearray | None) -> Reply:
        cfg, m, sglang = self.config, self.config.model, self.config.flavor == "sglang"
        if body is None:
            return error_reply(413, f"request body over {MAX_BODY} bytes")
        if trio.current_time() - self.started_at < cfg.startup_delay:
            return json_reply(503, {"error": "loading"})
        if method == "GET" and path == "/health":
            return Reply(503 if cfg.fail_health else 200)
        if method == "GET" and path == "/v1/models":
            return payloads.models(m, cfg.flavor, self.created)
        if method == "GET" and path == "/_stats":
            stats: dict[str, object] = {"port": self.port, "counts": dict(self.counts)}
            if self.simulator is not None:
                stats["cache"] = self.simulator.stats()
            return json_reply(200, stats)
        if method == "GET" and path == "/version" and not sglang:
            return json_reply(200, {"version": "0.0.0-fake"})
        if method == "GET" and path in ("/server_info", "/get_server_info") and sglang:
            return payloads.server_info(m, cfg.host, self.port)
        if method == "GET" and path in ("/model_info", "/get_model_info") and sglang:
            return payloads.model_info(m)
        if method != "POST" or path not in INFERENCE or (path == "/generate" and not sglang):
            return error_reply(404, f"no route {method} {path}", "not_found_error")
        if cfg.latency > 0:
            await trio.sleep(cfg.latency)
        try:
            if path == "/v1/embeddings":
                return payloads.embeddings(bytes(body), model=cfg.model)
            if path == "/generate":
                return payloads.generate(bytes(body), port=self.port, request_no=self.requests)
            chat = path == "/v1/chat/completions"
            pad_to = cfg.big_answer_bytes if chat else None
            return payloads.complete(
                bytes(body),
                chat=chat,
                model=cfg.model,
                port=self.port,
                request_no=self.requests,
                pad_to=pad_to,
            )
        except Refused as exc:
            return exc.reply


async def serve_fake_workers(
    ports: Sequence[int],
    config: FakeWorkerConfig,
    *,
    log: bool = False,
    task_status: trio.TaskStatus[list[FakeWorker]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one independent fake worker per port (0 = OS-chosen) until cancelled.

    ``task_status.started(workers)`` once every listener is bound; returns early only if every
    port died (``die_after``)."""
    workers: list[FakeWorker] = []
    try:
        for port in ports:
            listeners = await trio.open_tcp_listeners(port, host=config.host)
            workers.append(FakeWorker(replace(config), listeners, log=log))
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(worker.serve)
            task_status.started(workers)
    finally:
        for worker in workers:
            worker.close_listeners()


def parse_ports(spec: str, count: int | None = None) -> list[int]:
    """``21000-21009``, ``21000,21005-21006`` or ``0``; ``count`` repeats ``0`` N times."""
    ports: list[int] = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        ports.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    if count is not None:
        if ports != [0]:
            raise ValueError("--count goes with --ports 0 (OS-chosen ports)")
        ports = [0] * count
    return ports


async def _run(ports: list[int], config: FakeWorkerConfig, log: bool) -> int:
    workers: list[FakeWorker] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                workers = await nursery.start(partial(serve_fake_workers, ports, config, log=log))
            except OSError as exc:
                print(f"fake_worker: cannot listen: {exc}", file=sys.stderr, flush=True)
                return 1
            listening = {"listening": [w.port for w in workers], "host": config.host}
            listening |= {"model": config.model, "flavor": config.flavor}
            print(json.dumps(listening), flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    counts = {str(w.port): dict(w.counts) for w in workers}
    print(json.dumps({"counts": counts}), file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fake SGLang/vLLM/gRPC workers, one per port.")
    p.add_argument(
        "--ports",
        default="0",
        help="21000-21009 (below the ephemeral range), a comma list, or 0 (default)",
    )
    p.add_argument("--count", type=int, help="serve N OS-chosen ports (with --ports 0)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--flavor", choices=("sglang", "vllm", "grpc"), default="sglang")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before inference replies")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between SSE chunks")
    p.add_argument("--fail-health", action="store_true", help="/health answers 503")
    p.add_argument("--startup-delay", type=float, default=0.0, help="503 loading for N seconds")
    p.add_argument("--die-after", type=int, help="stop serving a port after N requests")
    p.add_argument(
        "--big-answer-bytes",
        type=int,
        metavar="N",
        help="plain chat completions padded to about N bytes",
    )
    model = p.add_argument_group("cache model (on with --cache-blocks; see the module docstring)")
    model.add_argument(
        "--cache-blocks", type=int, metavar="N", help="prefix cache capacity in blocks, per port"
    )
    model.add_argument("--block-tokens", type=int, default=16, help="tokens (words) per block")
    model.add_argument(
        "--prefill-ms-per-token", type=float, default=1.0, help="prefill time per uncached token"
    )
    model.add_argument(
        "--decode-ms-per-token", type=float, default=20.0, help="time per generated token"
    )
    model.add_argument("--prefill-slots", type=int, default=1, help="prefills at once, per port")
    model.add_argument("--slots", type=int, default=4, help="requests in service, per port")
    p.add_argument("--log", action="store_true", help="print one line per request")
    args = p.parse_args(argv)
    try:
        ports = parse_ports(args.ports, args.count)
    except ValueError as exc:
        p.error(str(exc))
    try:
        config = FakeWorkerConfig(
            **{f.name: getattr(args, f.name) for f in fields(FakeWorkerConfig)}
        )
    except ValueError as exc:
        p.error(str(exc))
    return trio.run(_run, ports, config, args.log)


if __name__ == "__main__":
    sys.exit(main())
