"""Benchmark: in-process registry throughput through open_gateway().

One cycle = add_worker (create, job queued) → the registration workflow detects the worker →
ready → remove_worker (idle, so removed at once). Detection is either a stub that answers at
once (``--detection stub``, the default: the registry's and workflows' own cost) or the real
Detector over httpx with a MockTransport (``--detection http``: adds httpx's cost of 2 to 4
probes). Cycles run from N concurrent clients, each on its own address. Prints one JSON line:
command, cores, cycles per second, per-cycle latency.

    .venv/bin/python scripts/bench_registry.py [--cycles 20000] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import httpx
import trio

if __package__ in (None, ""):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import GatewayConfig, open_gateway, worker_spec
from actors.registry.service import Gateway
from scripts.fake_detector import InstantDetector

MODELS = {"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "sglang"}]}


def worker_answers(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    return httpx.Response(404)


async def client(gateway: Gateway, index: int, cycles: int, latencies: list[float]) -> None:
    spec = worker_spec(f"10.{index // 250}.{index % 250}.1:8000")
    for _ in range(cycles):
        start = time.perf_counter()
        worker = await gateway.add_worker(spec)
        await gateway.wait_status(worker.id, "ready", 10)
        await gateway.remove_worker(worker.id)
        latencies.append(time.perf_counter() - start)


async def main(cycles: int, clients: int, detection: str) -> dict[str, object]:
    transport = httpx.MockTransport(worker_answers)
    detector = InstantDetector(model="bench") if detection == "stub" else None
    latencies: list[float] = []
    config = GatewayConfig()
    async with open_gateway(config, http_transport=transport, detector=detector) as gateway:
        await client(gateway, 10_000, 200, [])  # warm up
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(client, gateway, index, cycles // clients, latencies)
        elapsed = time.perf_counter() - start
        assert not gateway.snapshot.workers, "every worker was removed"
    latencies.sort()
    return {
        "detection": detection,
        "cycles": len(latencies),
        "clients": clients,
        "seconds": round(elapsed, 3),
        "cycles_per_sec": round(len(latencies) / elapsed, 1),
        "cycle_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "cycle_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--detection", choices=("stub", "http"), default="stub")
    args = parser.parse_args()
    figures = trio.run(main, args.cycles, args.clients, args.detection)
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    print(
        json.dumps(
            {
                "benchmark": "registry_in_process",
                "command": command,
                "cores": os.cpu_count(),
                **figures,
            }
        )
    )
