#!/usr/bin/env python3
"""Benchmark: the change feed under churn, and inference as a library call. One JSON line.

Feed: one gateway in this process with instant detection (no network), ``--clients`` tasks
churning (add a worker, wait until ready, remove it) for ``--duration`` seconds, three times:
with no watcher, with 1, with 100 (each watcher counts what it receives). Reports the churn
rate (cycles/s) of each run side by side, and the events per second the feed delivered to each
watcher and in total.

Inference: one fake worker process (scripts/fake_worker.py), ``--concurrency`` tasks sending
chat completions for ``--duration`` seconds through ``request()`` (actors/dataplane/client.py),
then the same through the HTTP API (serve_api on port 0, httpx clients; the client's own CPU
shares the 2 cores, so this figure is a floor, not the server's ceiling).

    .venv/bin/python scripts/bench_feed.py [--duration 5] [--clients 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from typing import Any

import httpx
import trio
import trio.testing

if __package__ in (None, ""):  # run as a file: make the project root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import GatewayConfig, open_gateway, worker_spec
from actors.core.model import Runtime
from actors.dataplane.client import request
from actors.registry.service import Gateway
from api.serve import serve_api
from scripts.fake_detector import InstantDetector

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def churn_run(duration: float, clients: int, watchers: int) -> dict[str, Any]:
    config = GatewayConfig(recheck_interval_secs=0)
    cycles = 0
    received = [0] * watchers
    async with open_gateway(config, detector=InstantDetector(runtime=Runtime.VLLM)) as gateway:
        feed = gateway.feed

        async def watcher(index: int, *, task_status: trio.TaskStatus[None]) -> None:
            async with feed.watch() as events:
                task_status.started()
                async for _ in events:
                    received[index] += 1

        async def churner(index: int, deadline: float) -> None:
            nonlocal cycles
            port = 0
            while trio.current_time() < deadline:
                port += 1
                spec = worker_spec(f"127.0.0.1:{10000 + index * 5000 + port % 5000}")
                worker = await gateway.add_worker(spec)
                await gateway.wait_status(worker.id, "ready", 10)
                await gateway.remove_worker(worker.id)
                cycles += 1

        async with trio.open_nursery() as nursery:
            for index in range(watchers):
                await nursery.start(watcher, index)
            start_seq = feed.seq
            started = time.perf_counter()
            deadline = trio.current_time() + duration
            async with trio.open_nursery() as churners:
                for index in range(clients):
                    churners.start_soon(churner, index, deadline)
            elapsed = time.perf_counter() - started
            await trio.testing.wait_all_tasks_blocked()  # the watchers catch up
            published = feed.seq - start_seq
            dropped = watchers - feed.subscriber_count
            nursery.cancel_scope.cancel()
    delivered = sum(received)
    return {
        "watchers": watchers,
        "churn_cycles_per_s": round(cycles / elapsed, 1),
        "events_published_per_s": round(published / elapsed, 1),
        "events_delivered_per_s_per_watcher": round(delivered / watchers / elapsed, 1)
        if watchers
        else None,
        "events_delivered_per_s_total": round(delivered / elapsed, 1),
        "watchers_dropped": dropped,
    }


async def requests_per_second(send: Any, duration: float, concurrency: int) -> float:
    done = 0
    deadline = trio.current_time() + duration

    async def loop() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            await send()
            done += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(loop)
    return round(done / (time.perf_counter() - started), 1)


async def inference_run(duration: float, concurrency: int) -> dict[str, Any]:
    command = [sys.executable, "scripts/fake_worker.py", "--ports", "0", "--model", "m"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
        [port] = json.loads(line)["listening"]
        async with open_gateway(GatewayConfig(recheck_interval_secs=0)) as gateway:
            worker = await gateway.add_worker(worker_spec(f"127.0.0.1:{port}"))
            await gateway.wait_status(worker.id, "ready", 10)
            library = await requests_per_second(
                partial(request, gateway, "/v1/chat/completions", CHAT), duration, concurrency
            )
            http = await _http_rate(gateway, duration, concurrency)
    finally:
        process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()
    return {
        "library_requests_per_s": library,
        "http_requests_per_s_httpx_client": http,
        "concurrency": concurrency,
    }


async def _http_rate(gateway: Gateway, duration: float, concurrency: int) -> float:
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0"))
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False) as client:

            async def send() -> None:
                answer = await client.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200

            rate = await requests_per_second(send, duration, concurrency)
        nursery.cancel_scope.cancel()
    return rate


async def main(args: argparse.Namespace) -> None:
    runs = [await churn_run(args.duration, args.clients, n) for n in (0, 1, 100)]
    base = runs[0]["churn_cycles_per_s"]
    result: dict[str, Any] = {
        "bench": "feed",
        "duration_s": args.duration,
        "churn_clients": args.clients,
        "churn": runs,
        "churn_with_100_watchers_share": round(runs[2]["churn_cycles_per_s"] / base, 3),
        "inference": await inference_run(args.duration, args.concurrency),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    trio.run(main, parser.parse_args())
