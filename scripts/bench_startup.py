#!/usr/bin/env python3
"""Benchmark: start-up of a gateway whose state file holds many ready workers.

Builds a SQLite state file of ``--workers`` ready workers (loopback addresses, one model)
directly through the store, then times ``open_gateway(GatewayConfig(state=PATH))`` until the
gateway is ready to serve (every worker routable in its snapshot), ``--runs`` times. Detection
and health probes go to a detector that answers at once, so nothing is contacted. Prints one
JSON line.

    .venv/bin/python scripts/bench_startup.py [--workers 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import GatewayConfig, open_gateway, worker_spec
from actors.core.codec import worker_to_plain
from actors.core.model import ConnectionMode, Detection, ModelCard, Runtime, Worker, WorkerStatus
from actors.store import Batch, SqliteStore
from scripts.fake_detector import InstantDetector

PREFIX = "00000000-0000-4000-8000-"


def build_state(path: str, workers: int) -> None:
    upserts: dict[str, dict[str, Any]] = {}
    for n in range(workers):
        address = f"127.{n // 250 % 250}.{n % 250}.1:{8000 + n // 62500}"
        spec = worker_spec(address, labels={"zone": "a"})
        detection = Detection(
            url=spec.url.with_scheme("http"),
            connection_mode=ConnectionMode.HTTP,
            runtime=Runtime.SGLANG,
            models=(ModelCard(id="m", details={"context_length": 4096}),),
        )
        ready = Worker(
            id=f"{PREFIX}{n + 1:012x}",
            spec=spec,
            status=WorkerStatus.READY,
            created_at=1.0,
            updated_at=1.0,
            detection=detection,
            is_healthy=True,
        )
        upserts[ready.id] = worker_to_plain(ready)
    with SqliteStore(path) as store:
        store.commit(
            Batch(
                upserts=upserts,
                id_prefix=PREFIX,
                id_high_water=workers + 1000,
                next_job_id=workers + 1,
            )
        )


async def time_start(path: str, workers: int) -> float:
    started = time.perf_counter()
    async with open_gateway(GatewayConfig(state=path), detector=InstantDetector()) as gateway:
        seconds = time.perf_counter() - started
        routable = len(gateway.snapshot.ready_for_model("m"))
        if routable != workers:
            raise RuntimeError(f"{routable} of {workers} workers routable after start-up")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state.db")
        build_state(path, args.workers)
        size = os.path.getsize(path)
        seconds = [trio.run(time_start, path, args.workers) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "benchmark": "startup_from_state",
                "command": " ".join([".venv/bin/python", *sys.argv]),
                "cores": os.cpu_count(),
                "workers": args.workers,
                "file_mb": round(size / 1e6, 1),
                "open_gateway_until_ready_s": [round(s, 3) for s in seconds],
            }
        )
    )


if __name__ == "__main__":
    main()
