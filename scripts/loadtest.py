#!/usr/bin/env python3
"""Load test of a gateway's worker or inference routes, over HTTP only (ours, smg, or a worker).

``--mode churn``: N clients, each owning one worker address, cycle for S seconds: POST /workers
(202) → poll GET /workers/{id} until ready → DELETE (202) → poll GET until 404. ``--mode
register``: POST N workers at once, poll each until ready, then DELETE them all (cleanup). One
JSON line: command, cores, figures (nearest-rank percentiles), every unexpected answer counted by
phase, method and status. Exit code 1 when a cycle failed or an answer was unexpected. A 409 on a
client's first POST (left by an earlier run) is deleted and POSTed again: ``leftovers_cleared``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import httpx
import trio

if __package__ in (None, ""):  # run as a file: make the project root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.load_inference import add_arguments, run_inference
from scripts.load_inference import percentile_ms as percentile_ms  # loadtest's API, too

T = TypeVar("T")
PHASES = ("post", "to_ready", "delete", "to_gone")


class CycleFailed(Exception):  # a cycle ends early; kind counts in unexpected (answers) or errors
    def __init__(self, kind: str, *, answer: bool = True) -> None:
        super().__init__(kind)
        self.kind, self.answer = kind, answer


@dataclass
class Slot:  # one worker address and what this run knows about it
    address: str
    worker_id: str | None = None
    expect_conflict: bool = True  # a 409 may be a leftover (first POST, or after a lost answer)


def worker_state(body: dict[str, Any]) -> str:
    """``status``; without that field (smg), a best guess from job_status and is_healthy."""
    if isinstance(status := body.get("status"), str):
        return status
    job = body.get("job_status")
    job_state = job.get("status") if isinstance(job, dict) else None
    healthy = body.get("is_healthy") is True and job_state in (None, "succeeded", "completed")
    return "failed" if job_state == "failed" else "ready" if healthy else "pending"


class Run:
    def __init__(self, client: httpx.AsyncClient, poll: float, cycle_timeout: float) -> None:
        self.client, self.poll, self.cycle_timeout = client, poll, cycle_timeout
        self.unexpected: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.leftovers_cleared = 0

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, Any]]:
        response = await self.client.request(method, path, json=body)
        try:
            parsed = response.json()
        except ValueError:  # not JSON: judged by its status alone
            parsed = None
        return response.status_code, parsed if isinstance(parsed, dict) else {}

    async def post(self, slot: Slot) -> float:
        """POST until a 202 (a leftover 409 is deleted first); the start time of that POST."""
        while True:
            start = time.perf_counter()
            status, body = await self.call("POST", "/workers", {"url": slot.address})
            found = body.get("worker_id")
            if status == 202 and isinstance(found, str):
                slot.worker_id, slot.expect_conflict = found, False
                return start
            if status == 409 and isinstance(found, str):
                slot.worker_id = found  # deleted either way, by us now or by the cleanup
                if slot.expect_conflict:
                    self.leftovers_cleared += 1
                    await self.ensure_gone(slot)
                    continue
            raise CycleFailed(f"POST {status}" + ("" if status != 202 else " without worker_id"))

    async def wait_ready(self, slot: Slot) -> None:
        while True:
            status, body = await self.call("GET", f"/workers/{slot.worker_id}")
            if status != 200:
                raise CycleFailed(f"to_ready GET {status}")
            state = worker_state(body)
            if state == "ready":
                return
            if state == "failed":
                raise CycleFailed("worker_failed", answer=False)
            if state != "pending":
                raise CycleFailed(f"to_ready GET 200 status={state}")
            await trio.sleep(self.poll)

    async def delete(self, slot: Slot) -> None:
        status, _ = await self.call("DELETE", f"/workers/{slot.worker_id}")
        if status != 202:
            raise CycleFailed(f"DELETE {status}")

    async def wait_gone(self, slot: Slot) -> None:
        while True:
            status, body = await self.call("GET", f"/workers/{slot.worker_id}")
            if status == 404:
                slot.worker_id = None
                return
            if status != 200:
                raise CycleFailed(f"to_gone GET {status}")
            if body.get("status", "draining") != "draining":
                raise CycleFailed(f"to_gone GET 200 status={body.get('status')}")
            await trio.sleep(self.poll)

    async def remove(self, slot: Slot) -> None:
        await self.delete(slot)
        await self.wait_gone(slot)

    async def ensure_gone(self, slot: Slot) -> None:
        """Best effort, answers not judged: DELETE the slot's worker and wait until it is gone."""
        if slot.worker_id is None:
            return
        try:
            with trio.fail_after(self.cycle_timeout):
                await self.call("DELETE", f"/workers/{slot.worker_id}")
                while (await self.call("GET", f"/workers/{slot.worker_id}"))[0] != 404:  # noqa: ASYNC110
                    await trio.sleep(self.poll)
        except (trio.TooSlowError, httpx.HTTPError):
            self.errors["cleanup_failed"] += 1
            slot.expect_conflict = True
        slot.worker_id = None

    async def attempt(self, slot: Slot, steps: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``steps`` under the cycle timeout; on failure count it, clean up, return None."""
        try:
            with trio.fail_after(self.cycle_timeout):
                return await steps()
        except CycleFailed as failure:
            (self.unexpected if failure.answer else self.errors)[failure.kind] += 1
        except (trio.TooSlowError, httpx.HTTPError) as error:
            slow = isinstance(error, trio.TooSlowError)
            self.errors["timeout" if slow else type(error).__name__] += 1
            slot.expect_conflict |= slot.worker_id is None  # a POST may have landed unseen
            await trio.sleep(0 if slow else max(self.poll, 0.01))  # a gateway down: do not spin
        await self.ensure_gone(slot)
        return None


async def churn(run: Run, slots: list[Slot], duration: float) -> dict[str, object]:
    samples: dict[str, list[float]] = {name: [] for name in (*PHASES, "cycle")}
    failed = 0

    async def cycle(slot: Slot) -> list[float]:
        marks = [await run.post(slot), time.perf_counter()]
        for step in (run.wait_ready, run.delete, run.wait_gone):
            await step(slot)
            marks.append(time.perf_counter())
        return marks

    async def client(slot: Slot, deadline: float) -> None:
        nonlocal failed
        while time.perf_counter() < deadline:
            marks = await run.attempt(slot, lambda: cycle(slot))
            if marks is None:
                failed += 1
                continue
            for name, begin, end in zip(PHASES, marks, marks[1:], strict=False):
                samples[name].append(end - begin)
            samples["cycle"].append(marks[-1] - marks[0])

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for slot in slots:
            nursery.start_soon(client, slot, start + duration)
    elapsed = time.perf_counter() - start
    cycles = len(samples["cycle"])
    return {
        "clients": len(slots),
        "seconds": round(elapsed, 3),
        "cycles": cycles,
        "failed_cycles": failed,
        "cycles_per_sec": round(cycles / elapsed, 1),
        "cycle_p50_ms": percentile_ms(samples["cycle"], 50),
        "cycle_p99_ms": percentile_ms(samples["cycle"], 99),
        **{f"{name}_p50_ms": percentile_ms(samples[name], 50) for name in PHASES},
    }


async def register(run: Run, slots: list[Slot]) -> dict[str, object]:
    post: list[float] = []
    to_ready: list[float] = []
    ready: list[Slot] = []

    async def one(slot: Slot) -> None:
        async def steps() -> bool:
            start = await run.post(slot)
            post.append(time.perf_counter() - start)
            await run.wait_ready(slot)
            to_ready.append(time.perf_counter() - start)
            return True

        if await run.attempt(slot, steps):
            ready.append(slot)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for slot in slots:
            nursery.start_soon(one, slot)
    all_ready = time.perf_counter() - start
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for slot in ready:
            nursery.start_soon(run.attempt, slot, partial(run.remove, slot))
    cleanup = time.perf_counter() - start
    return {
        "workers": len(slots),
        "samples": len(to_ready),
        "failed": len(slots) - len(ready),
        "all_ready_seconds": round(all_ready, 3),
        "post_to_ready_p50_ms": percentile_ms(to_ready, 50),
        "post_to_ready_p99_ms": percentile_ms(to_ready, 99),
        "post_to_ready_max_ms": percentile_ms(to_ready, 100),
        "post_p50_ms": percentile_ms(post, 50),
        "post_p99_ms": percentile_ms(post, 99),
        "cleanup_seconds": round(cleanup, 3),
    }


async def main(args: argparse.Namespace, addresses: list[str]) -> dict[str, object]:
    if args.mode == "inference":
        return await run_inference(args)
    count = args.clients if args.mode == "churn" else args.workers
    headers = {"Authorization": f"Bearer {args.admin_api_key}"} if args.admin_api_key else {}
    limits = httpx.Limits(max_connections=count * 2, max_keepalive_connections=count * 2)
    async with httpx.AsyncClient(
        base_url=args.gateway, limits=limits, headers=headers, timeout=None, trust_env=False
    ) as client:
        run = Run(client, args.poll_ms / 1000, args.cycle_timeout)
        slots = [Slot(address) for address in addresses[:count]]
        mode = churn(run, slots, args.duration) if args.mode == "churn" else register(run, slots)
        figures = await mode
    errors, unexpected = dict(sorted(run.errors.items())), dict(sorted(run.unexpected.items()))
    return {
        **figures,
        "leftovers_cleared": run.leftovers_cleared,
        "errors": errors,
        "unexpected": unexpected,
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--gateway", "--url", required=True, help="base URL, e.g. http://127.0.0.1:30000")
    add("--mode", required=True, choices=("churn", "register", "inference"))
    add("--clients", type=int, default=1, help="churn: concurrent clients, one address each")
    add("--duration", type=float, default=10.0, help="churn, inference: seconds measured")
    add("--workers", type=int, default=100, help="register: workers POSTed at once")
    where = parser.add_mutually_exclusive_group()  # churn and register: required
    where.add_argument("--worker-urls", nargs="+", metavar="URL", help="H:P or scheme://H:P")
    where.add_argument("--worker-ports", metavar="A-B", help="127.0.0.1:P for each port")
    add("--poll-ms", type=float, default=2.0, help="interval between polls of GET /workers/{id}")
    add("--cycle-timeout", type=float, default=30.0, help="seconds before a cycle is an error")
    add("--admin-api-key", default=None, help="sent as Authorization: Bearer")
    add_arguments(parser)
    args = parser.parse_args(argv)
    addresses: list[str] = args.worker_urls or []
    if args.worker_ports:
        first, _, last = args.worker_ports.partition("-")
        addresses = [f"127.0.0.1:{p}" for p in range(int(first), int(last or first) + 1)]
    count = args.clients if args.mode == "churn" else args.workers
    if args.mode != "inference" and not 1 <= count <= len(addresses):
        parser.error(f"{count} clients/workers need 1..{len(addresses)} worker addresses")
    return args, addresses


def redacted(argv: list[str]) -> list[str]:
    """The command line with the admin key's value hidden."""
    secret = {i + 1 for i, arg in enumerate(argv) if arg == "--admin-api-key"}
    hide = partial(re.sub, r"^(--admin-api-key=).+", r"\1***")
    return ["***" if i in secret else hide(arg) for i, arg in enumerate(argv)]


if __name__ == "__main__":
    arguments, worker_addresses = parse_args()
    figures = trio.run(main, arguments, worker_addresses)
    command = " ".join([os.path.relpath(sys.executable), *redacted(sys.argv)])
    print(
        json.dumps(
            {
                "benchmark": f"loadtest_{arguments.mode}",
                "command": command,
                "cores": os.cpu_count(),
                **figures,
            }
        ),
        flush=True,
    )
    bad = ("failed_cycles", "unexpected", "errors", "failures")  # inference: failures, 0 requests
    sys.exit(1 if any(figures.get(key) for key in bad) or figures.get("requests") == 0 else 0)
