#!/usr/bin/env python3
"""Stress: hostile and careless clients against a live gateway while normal traffic runs.

Starts one fake-worker process (``scripts/fake_worker.py``, model ``fake-model``) and one gateway
process (``python -m api.cli serve --port 0``) whose file limit is soft 1,024 / hard 4,096 (the
common default; a gateway may raise its soft limit to the hard one) and a "big answer" fake-worker
process (model ``big-model``, ``--big-answer-bytes``: answers of ``--big-bytes``), registers both
workers, then
for ``--duration`` seconds runs all at once:

* ``normal``: ``--connections`` keep-alive connections sending chat completions back to back;
* ``resets``: connections reset (SO_LINGER 0) right after connecting, or after half a head;
* ``slow_heads`` / ``slow_bodies``: slowloris: a request head, or a body, one byte at a time;
* ``non_readers``: clients that ask the big worker for an answer and never read it;
* ``idle``: ``--idle`` connections (2,000) that send nothing, against the 1,024 file limit;
* ``fresh``: a new connection every 0.2 s asking ``GET /health`` (can new clients get in?).

Then every attacking connection is closed and ``GET /health`` on a new connection says whether
the gateway is still up. One JSON line: the command, cores, normal requests served and their
p50/p99, what each attack saw, errors by kind, the gateway's RSS (VmRSS) before, at most and
after, and ``still_up``. Exit code 0 when the gateway is still up and served normal requests.

    .venv/bin/python scripts/stress.py [--duration 20] [--only normal,idle,...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO

import httpx
import trio

if __package__ in (None, ""):  # run as a file: make the project root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_churn import Child, fake_worker_command, gateway_command, stop_children
from scripts.bench_inference import register_workers
from scripts.load_inference import Connection, ServerClosed, percentile_ms
from scripts.load_inference import ProtocolError as BrokenAnswer

ATTACKS = ("normal", "resets", "slow_heads", "slow_bodies", "non_readers", "idle", "fresh")
MODEL, BIG_MODEL = "fake-model", "big-model"
CHAT = b'{"model": "%s", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}'
# run the gateway under a file limit: exec keeps the pid, so /proc/<pid> is the gateway's
WITH_NOFILE = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[3:]])"
)
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST
REQUEST_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0


@dataclass
class Tally:
    """Everything the run saw: events by attack, errors by kind, normal latencies."""

    events: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    normal: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)
    rss_max_kb: int | None = None

    def error(self, kind: str, error: BaseException | str) -> None:
        name = error if isinstance(error, str) else _error_name(error)
        self.errors[f"{kind}.{name}"] += 1


def _error_name(error: BaseException) -> str:
    """The error's type, with the errno's text of the OSError behind it when there is one."""
    todo = [error]
    while todo:  # trio.open_tcp_stream wraps the refusals of every address it tried
        current = todo.pop(0)
        if isinstance(current, OSError) and current.errno is not None:
            return f"{type(current).__name__}({os.strerror(current.errno)})"
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__,) if e is not None)
    return type(error).__name__


class Stress:
    def __init__(self, args: argparse.Namespace, host: str, port: int, tally: Tally) -> None:
        self.args, self.host, self.port, self.tally = args, host, port, tally
        self.netloc = f"{host}:{port}"

    async def connect(self) -> trio.SocketStream:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await trio.open_tcp_stream(self.host, self.port)

    def request(self, model: str, *, content_length: int | None = None) -> bytes:
        body = CHAT % model.encode()
        length = len(body) if content_length is None else content_length
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
        return head.encode() + (body if content_length is None else b"")

    # ---- normal traffic -------------------------------------------------------------------

    async def normal(self) -> None:
        conn = Connection(self.host, self.port, self.request(MODEL), stream=False)
        try:
            while True:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        exchange = await conn.exchange_retrying_stale()
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio.TooSlowError,
                    ServerClosed,
                    BrokenAnswer,
                ) as error:
                    self.tally.error("normal", error)
                    await conn.close()
                    await trio.sleep(0.05)  # a gateway that is down refuses at once: no spinning
                    continue
                if exchange.status == 200:
                    self.tally.normal.append(exchange.last - exchange.sent)
                else:
                    self.tally.error("normal", f"status_{exchange.status}")
        finally:
            await conn.close()

    async def fresh(self) -> None:
        """A new client every 0.2 s: GET /health on a new connection, answered within 2 s?"""
        head = f"GET /health HTTP/1.1\r\nHost: {self.netloc}\r\nConnection: close\r\n\r\n"
        while True:
            start = time.perf_counter()
            try:
                with trio.fail_after(2):
                    stream = await trio.open_tcp_stream(self.host, self.port)
                    async with stream:
                        await stream.send_all(head.encode())
                        answer = await _read_some(stream)
                if answer.startswith(b"HTTP/1.1 200"):
                    self.tally.fresh.append(time.perf_counter() - start)
                else:
                    self.tally.error("fresh", f"answer_{answer[:12].decode('latin-1')!r}")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
                self.tally.error("fresh", error)
            await trio.sleep(max(0.0, 0.2 - (time.perf_counter() - start)))

    # ---- attacks --------------------------------------------------------------------------

    async def resets(self) -> None:
        """Connect and reset at once; every other time after half a request head."""
        interval = 1 / self.args.resets_per_sec
        half_head = self.request(MODEL)[:40]
        for count in range(sys.maxsize):
            try:
                stream = await self.connect()
                if count % 2:
                    await stream.send_all(half_head)
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                stream.socket.close()  # with linger 0: an RST, not a FIN
                self.tally.events["resets.sent"] += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
                self.tally.error("resets", error)
            await trio.sleep(interval)

    async def slowloris(self, name: str, first: bytes, dribble: bytes) -> None:
        """Send ``first``, then ``dribble`` one byte per --slow-interval; note how it ends."""
        start = time.perf_counter()
        try:
            stream = await self.connect()
        except (OSError, trio.TooSlowError) as error:
            self.tally.error(name, error)
            return
        ended = "held_to_the_end"
        try:
            async with stream:
                await stream.send_all(first)
                for byte in dribble:
                    with trio.move_on_after(self.args.slow_interval):
                        answer = await stream.receive_some()
                        ended = "answered" if answer else "closed_by_server"
                        break
                    await stream.send_all(bytes([byte]))
                else:
                    await trio.sleep_forever()  # it sent everything: wait for its answer
        except (trio.BrokenResourceError, OSError):
            ended = "closed_by_server"
        finally:
            self.tally.events[f"{name}.{ended}"] += 1
            if ended != "held_to_the_end":
                seconds = round(time.perf_counter() - start, 1)
                key = f"{name}.longest_held_secs"
                self.tally.events[key] = max(self.tally.events[key], int(seconds))

    async def slow_heads(self) -> None:
        start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + self.netloc.encode() + b"\r\n"
        endless = b"X-Slow: " + b"a" * 1_000_000  # never ends: the head must be cut off
        async with trio.open_nursery() as nursery:
            for _ in range(self.args.slow):
                nursery.start_soon(self.slowloris, "slow_heads", start, endless)

    async def slow_bodies(self) -> None:
        head = self.request(MODEL, content_length=100_000)
        async with trio.open_nursery() as nursery:
            for _ in range(self.args.slow):
                nursery.start_soon(self.slowloris, "slow_bodies", head, b"a" * 100_000)

    async def non_readers(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.args.non_readers):
                nursery.start_soon(self.non_reader)

    async def non_reader(self) -> None:
        """Ask for a big answer on a connection with a small receive buffer; never read it."""
        try:
            stream = await self.connect()
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            async with stream:
                await stream.send_all(self.request(BIG_MODEL))
                self.tally.events["non_readers.asked"] += 1
                await trio.sleep_forever()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
            self.tally.error("non_readers", error)

    async def idle(self) -> None:
        """Open --idle connections (100 connecting at a time) that never send a byte."""
        connecting = trio.Semaphore(100)
        async with trio.open_nursery() as nursery:
            for _ in range(self.args.idle):
                await connecting.acquire()
                nursery.start_soon(self.one_idle, connecting)

    async def one_idle(self, connecting: trio.Semaphore) -> None:
        try:
            try:
                stream = await self.connect()
            finally:
                connecting.release()
            async with stream:
                self.tally.events["idle.open"] += 1
                answer = await _read_some(stream)  # until the server answers or closes it
            self.tally.events["idle.closed_by_server" if not answer else "idle.answered"] += 1
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
            self.tally.error("idle", error)


async def _read_some(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:  # a reset
        return b""


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def watch_rss(pid: int, tally: Tally) -> None:
    while True:
        if (kb := rss_kb(pid)) is not None:
            tally.rss_max_kb = max(tally.rss_max_kb or 0, kb)
        await trio.sleep(0.5)


async def still_up(gateway: str) -> bool:
    """GET /health on a new connection answers 200 within 5 s."""
    try:
        async with httpx.AsyncClient(base_url=gateway, trust_env=False, timeout=5) as client:
            return (await client.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False


def raise_own_file_limit(needed: int) -> int:
    """Raise this process's soft file limit to its hard one; the connections it can afford."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return min(needed, soft - 200)  # room for the rest: workers, pipes, the other attacks


async def attack(args: argparse.Namespace, gateway: str, pid: int, tally: Tally) -> None:
    host, _, port = gateway.removeprefix("http://").rpartition(":")
    stress = Stress(args, host, int(port), tally)
    runs: dict[str, Callable[[], Awaitable[None]]] = {
        "normal": stress.normal,
        "resets": stress.resets,
        "slow_heads": stress.slow_heads,
        "slow_bodies": stress.slow_bodies,
        "non_readers": stress.non_readers,
        "idle": stress.idle,
        "fresh": stress.fresh,
    }
    with trio.move_on_after(args.duration):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_rss, pid, tally)
            for name in args.only:
                for _ in range(args.connections if name == "normal" else 1):
                    nursery.start_soon(runs[name])
    # leaving the nursery closed every attacking connection


async def main(args: argparse.Namespace) -> dict[str, object]:
    args.idle = raise_own_file_limit(args.idle)
    soft, hard = args.gateway_nofile
    fake = fake_worker_command(1, "--model", MODEL)
    big = fake_worker_command(1, "--model", BIG_MODEL, "--big-answer-bytes", str(args.big_bytes))
    serve = gateway_command(python=[sys.executable, "-c", WITH_NOFILE, str(soft), str(hard)])
    tally = Tally()
    figures: dict[str, object] = {}
    with ExitStack() as logs:
        fake_log, big_log, serve_log = (logs.enter_context(tempfile.TemporaryFile()) for _ in "123")
        children = [
            Child("fake_worker", fake, fake_log),
            Child("big_worker", big, big_log),
            Child("gateway", serve, serve_log),
        ]
        gateway_child = children[-1]
        up = False
        try:
            [port] = await children[0].start()
            [big_port] = await children[1].start()
            gateway: str = await gateway_child.start()
            await register_workers(gateway, [port, big_port])
            assert gateway_child.process is not None
            pid = gateway_child.process.pid
            rss_before = rss_kb(pid)
            started = time.perf_counter()
            await attack(args, gateway, pid, tally)
            seconds = time.perf_counter() - started
            await trio.sleep(1)  # the gateway notices the closed connections
            up = await still_up(gateway)
            figures = {
                "seconds": round(seconds, 1),
                "gateway_nofile": {"soft": soft, "hard": hard},
                "rss_kb": {"before": rss_before, "max": tally.rss_max_kb, "after": rss_kb(pid)},
                "gateway_exit_code": gateway_child.process.returncode,
                "big_answers_sent": await big_answers_sent(big_port),
            }
        finally:
            await stop_children(children, show_logs=False)
            if not up:
                _show_tail(serve_log)
    normal = tally.normal
    return {
        "still_up": up,
        "normal": {
            "requests": len(normal),
            "per_sec": round(len(normal) / args.duration, 1),
            "p50_ms": percentile_ms(normal, 50),
            "p99_ms": percentile_ms(normal, 99),
        },
        "fresh_health": {"ok": len(tally.fresh), "p99_ms": percentile_ms(tally.fresh, 99)},
        "attacks": dict(sorted(tally.events.items())),
        "errors": dict(sorted(tally.errors.items())),
        **figures,
    }


async def big_answers_sent(port: int) -> int:
    """How many chat completions the big worker answered (its ``GET /_stats``)."""
    async with httpx.AsyncClient(trust_env=False, timeout=REQUEST_TIMEOUT) as client:
        stats = (await client.get(f"http://127.0.0.1:{port}/_stats")).json()
    return int(stats["counts"].get("POST /v1/chat/completions", 0))


def _show_tail(log: IO[bytes], lines: int = 30) -> None:
    """The last lines of the gateway's stderr, on our stderr (it may be long: resets log)."""
    log.seek(0)
    text = log.read().decode(errors="replace").splitlines()[-lines:]
    if text:
        sys.stderr.write("--- gateway stderr (tail) ---\n" + "\n".join(text) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--duration", type=float, default=20.0, help="seconds the attacks run")
    add("--connections", type=int, default=4, help="normal keep-alive connections")
    add("--idle", type=int, default=2000, help="idle connections held open")
    add("--slow", type=int, default=50, help="slowloris connections, each of heads and bodies")
    add("--slow-interval", type=float, default=0.5, help="seconds between slowloris bytes")
    add("--non-readers", type=int, default=10, help="clients that never read a big answer")
    add("--big-bytes", type=int, default=8 * 1024 * 1024, help="size of a big answer")
    add("--resets-per-sec", type=float, default=50.0, help="connections reset at once")
    add(
        "--gateway-nofile",
        default="1024:4096",
        metavar="SOFT:HARD",
        help="the gateway's RLIMIT_NOFILE",
    )
    add("--only", default=",".join(ATTACKS), help=f"comma-separated subset of {','.join(ATTACKS)}")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    if unknown := set(args.only) - set(ATTACKS):
        parser.error(f"unknown --only {sorted(unknown)}; choose from {','.join(ATTACKS)}")
    soft, _, hard = args.gateway_nofile.partition(":")
    own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard_limit = int(hard or soft)
    if own_hard != resource.RLIM_INFINITY:
        hard_limit = min(hard_limit, own_hard)  # an unprivileged process cannot go above
    args.gateway_nofile = (min(int(soft), hard_limit), hard_limit)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    requested_idle = arguments.idle
    result: dict[str, object] = {"still_up": False, "normal": {"requests": 0}}
    try:
        result = trio.run(main, arguments)
    except* KeyboardInterrupt:
        print("stress: interrupted; its children were stopped", file=sys.stderr)
        sys.exit(130)
    except* (OSError, RuntimeError, httpx.HTTPError, trio.TooSlowError) as group:
        failure = group.exceptions[0]
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
        result["error"] = f"setup failed: {type(failure).__name__}: {failure}"
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    line = {
        "benchmark": "stress",
        "command": command,
        "cores": os.cpu_count(),
        "duration": arguments.duration,
        "idle_requested": requested_idle,
        "idle_affordable": arguments.idle,
        **result,
    }
    print(json.dumps(line), flush=True)
    normal = result["normal"]
    served = isinstance(normal, dict) and normal.get("requests", 0) > 0
    sys.exit(0 if result["still_up"] is True and served else 1)
