"""Benchmark: the SQLite store's commit rate, the writer thread's cost, and start-up loading.

* commits/s for batches of 1 and 16 upserts (realistic ready workers, about 1 KB of JSON each,
  updated in place in a table of 1,000), with ``synchronous`` NORMAL (the default) and FULL,
  called directly (blocking) and through ``open_store_writer`` (the registry's path: one
  dedicated thread);
* the round trip of a no-op call through the dedicated writer thread against
  ``trio.to_thread.run_sync`` with ``CapacityLimiter(1)`` (the alternative it was chosen over);
* opening (lock, inspect with quick_check, connect) and loading a file of 10,000 workers.

Prints one JSON line. Files go to a temporary folder (``--dir`` to choose the disk).

    .venv/bin/python scripts/bench_store.py [--commits 2000] [--workers 10000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.store import Batch, MemoryStore, SqliteStore, StoredState
from actors.store.sqlite import Synchronous
from actors.store.writer import WriterThread, open_store_writer

POOL = 1000


def ready_worker(number: int, updated_at: float = 0.0) -> dict[str, Any]:
    url = f"http://10.{number // 65536}.{number // 256 % 256}.{number % 256}:8000"
    return {
        "id": f"0f1e2d3c-4b5a-4987-a654-{number:012x}",
        "spec": {
            "url": url,
            "model_id": None,
            "worker_type": "regular",
            "bootstrap_port": None,
            "runtime": None,
            "priority": 50,
            "cost": 1.0,
            "labels": {"zone": "eu-west-1a", "pool": "bench"},
            "api_key": None,
            "health": {
                "timeout_secs": 5.0,
                "check_interval_secs": 10.0,
                "failure_threshold": 3,
                "success_threshold": 2,
                "disable": False,
                "drain_settle_secs": 0.0,
            },
            "max_connection_attempts": None,
            "registration_timeout_secs": None,
            "recheck_interval_secs": None,
            "drain_timeout_secs": None,
        },
        "status": "ready",
        "created_at": 1.0,
        "updated_at": updated_at,
        "spec_version": 1,
        "is_healthy": True,
        "detection": {
            "url": url,
            "connection_mode": "http",
            "runtime": "sglang",
            "models": [{"id": "meta-llama/Llama-3.1-8B-Instruct", "details": {"max_len": 8192}}],
            "labels": {},
        },
        "job": {
            "job_id": number + 1,
            "job_type": "AddWorker",
            "state": "succeeded",
            "message": None,
            "attempts": 1,
            "updated_at": 1.0,
        },
    }


def batches(size: int, count: int) -> list[Batch]:
    out = []
    for number in range(count):
        workers = [ready_worker((number * size + i) % POOL, float(number)) for i in range(size)]
        out.append(Batch(upserts={worker["id"]: worker for worker in workers}))
    return out


def seeded(path: Path, synchronous: Synchronous, workers: int) -> SqliteStore:
    store = SqliteStore(path, synchronous=synchronous)
    rows = [ready_worker(number) for number in range(workers)]
    store.commit(
        Batch(
            upserts={row["id"]: row for row in rows},
            id_prefix="0f1e2d3c-4b5a-4987-a654-",
            id_high_water=workers + 1000,
            next_job_id=workers + 1000,
        )
    )
    return store


def commit_all(store: SqliteStore, todo: list[Batch]) -> None:
    for batch in todo:
        store.commit(batch)


def rate(run: Callable[[], None], count: int) -> float:
    started = time.perf_counter()
    run()
    return round(count / (time.perf_counter() - started), 1)


async def via_writer(path: Path, synchronous: Synchronous, todo: list[Batch]) -> float:
    seeded(path, synchronous, POOL).close()
    async with open_store_writer(partial(SqliteStore, path, synchronous=synchronous)) as writer:
        started = time.perf_counter()
        for batch in todo:
            await writer.commit(batch)
        return round(len(todo) / (time.perf_counter() - started), 1)


async def call_overhead_us(calls: int) -> dict[str, float]:
    def nothing() -> None:
        return None

    thread = WriterThread(trio.lowlevel.current_trio_token(), name="bench")
    limiter = trio.CapacityLimiter(1)
    best = {"dedicated_thread": float("inf"), "to_thread_limiter_1": float("inf")}
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(calls):
            await thread.run(nothing)
        best["dedicated_thread"] = min(
            best["dedicated_thread"], (time.perf_counter() - started) / calls * 1e6
        )
        started = time.perf_counter()
        for _ in range(calls):
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(nothing, limiter=limiter)
        best["to_thread_limiter_1"] = min(
            best["to_thread_limiter_1"], (time.perf_counter() - started) / calls * 1e6
        )
    thread.stop()
    return {name: round(value, 1) for name, value in best.items()}


async def memory_commits(todo: list[Batch]) -> float:
    async with open_store_writer(MemoryStore) as writer:
        started = time.perf_counter()
        for batch in todo:
            await writer.commit(batch)
        return round(len(todo) / (time.perf_counter() - started), 1)


def loading(folder: Path, workers: int) -> dict[str, float]:
    path = folder / "load.db"
    seeded(path, "normal", workers).close()
    started = time.perf_counter()
    store = SqliteStore(path)
    opened = time.perf_counter()
    state: StoredState = store.load()
    loaded = time.perf_counter()
    store.close()
    assert len(state.workers) == workers
    started_unchecked = time.perf_counter()
    SqliteStore(path, check=False).close()
    unchecked = time.perf_counter() - started_unchecked
    return {
        "workers": workers,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "open_s": round(opened - started, 3),
        "open_without_quick_check_s": round(unchecked, 3),
        "load_s": round(loaded - opened, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": " ".join(["scripts/bench_store.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        folder = Path(name)
        direct: dict[str, dict[str, float]] = {}
        threaded: dict[str, dict[str, float]] = {}
        for synchronous in ("normal", "full"):
            for size in (1, 16):
                todo = batches(size, args.commits)
                path = folder / f"{synchronous}-{size}.db"
                store = seeded(path, synchronous, POOL)
                direct.setdefault(synchronous, {})[str(size)] = rate(
                    partial(commit_all, store, todo), len(todo)
                )
                store.close()
                threaded.setdefault(synchronous, {})[str(size)] = trio.run(
                    via_writer, folder / f"w-{synchronous}-{size}.db", synchronous, todo
                )
        result["commits_per_s_direct"] = direct
        result["commits_per_s_via_writer"] = threaded
        result["commits_per_s_memory_via_writer"] = {
            "1": trio.run(memory_commits, batches(1, args.commits)),
            "16": trio.run(memory_commits, batches(16, args.commits)),
        }
        result["call_round_trip_us"] = trio.run(call_overhead_us, args.commits)
        result["load"] = loading(folder, args.workers)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
