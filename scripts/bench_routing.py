#!/usr/bin/env python3
"""Benchmark: routing quality on a simulated fleet, by replaying a seeded trace of chat sessions.

**The fleet**: ``--workers`` (8) fake workers in one ``scripts/fake_worker.py`` process with the
cache model on (``--cache-blocks`` etc.: a prefix cache of word blocks with LRU eviction, limited
prefill concurrency, slots, per-token prefill and decode times; see that script's docstring).

**The gateway**: ours (``python -m api.cli serve --port 0 --policy P``, the workers registered
through ``POST /workers``), or smg (``--smg-binary PATH``: ``smg launch --worker-urls ...
--policy P``), or any running gateway (``--gateway URL``: the workers are registered through
``POST /workers`` and deleted at the end).

**The trace** (``scripts/routing_trace.py``'s ``make_trace``, deterministic for a seed):
``--prompts`` (12) system prompts of 400-800 words; sessions arrive over ``--duration`` seconds and
pick a system prompt with Zipf-like weights (``1 / rank ** 0.6``); during the hot phase (40-70 % of
the arrival window) two system prompts (drawn from the seed among all but the most popular) get 3x
their traffic (extra sessions, so the load rises too). A session has 3-7 turns; each turn sends the
system prompt, the whole history (every earlier user message and assistant answer, in order) and a
new user message of 15-60 words, as a streaming chat completion with ``max_tokens`` = the length of
this turn's assistant answer (16-48 words). The assistant text appended to the history is the
trace's own, not what the worker answered, so prompts are the same whatever the routing. The next
turn starts a think time (exponential, mean ``--think-secs``) after the answer ended. The load:
``--sessions 1x`` is ``BASE_SESSIONS`` sessions per 20 s of ``--duration``; ``2x`` twice that
(``N`` alone: N sessions).

**The figures** (one JSON line per run): hit rate = sum of ``x-cached-tokens`` / sum of
``x-prompt-tokens`` over the answered turns; time to first token (first body byte, at the
client) p50/p99; end-to-end p50; worker queue time p50/p99 (``x-queue-ms``); turns per second
(answered turns / wall time of the run); requests per worker (by ``x-fake-worker-port``, else
the ``[port N]`` of the first token, else ``x-worker-id``) and the imbalance ``max / mean``;
errors by kind. And ``oracle_hit_rate``, the best any router could do on this trace: every turn,
in the trace's nominal order (session start + think times, service taking no time), looked up in
one cache of unlimited size that has seen every earlier prompt (as if each prompt always went to
a worker that already held its longest seen prefix, ignoring capacity and load). Its misses are
each system prompt's first use, each new user message and the previous answer, and the partial
blocks at the ends of prompts.

``--compare`` runs ``COMPARE_POLICIES`` x loads ``1x 2x`` x seeds ``1 2`` against our gateway
(plus smg's ``cache_aware`` when ``--smg-binary`` is given) and ends with one ``compare`` line
side by side. A policy that ``tmg serve`` refuses is recorded as skipped, with the reason.

    .venv/bin/python scripts/bench_routing.py --policy cache_aware --sessions 2x --seed 1
    .venv/bin/python scripts/bench_routing.py --compare [--smg-binary /tmp/smg-venv/bin/smg]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
import trio

if __package__ in (None, ""):  # run as a file: make the project root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_churn import (
    ROOT,
    RUN_FAILURES,
    Child,
    fake_worker_command,
    gateway_command,
    run_orchestrator,
)
from scripts.load_inference import percentile_ms
from scripts.loadtest import worker_state
from scripts.routing_trace import (
    Session,
    Trace,
    make_trace,
    oracle_hit_rate,
    session_count,
)

MODEL = "fake-model"
COMPARE_POLICIES = ("round_robin", "cache_aware")
COMPARE_LOADS = ("1x", "2x")
COMPARE_SEEDS = (1, 2)
READY_TIMEOUT = 60.0
_PORT_IN_BODY = re.compile(rb"\[port (\d+)\]")


# ---- the replay ----


@dataclass
class Results:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    without_cache_headers: int = 0
    per_worker: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


def _worker_of(headers: httpx.Headers, first_bytes: bytes) -> str:
    if port := headers.get("x-fake-worker-port"):
        return str(port)
    if found := _PORT_IN_BODY.search(first_bytes):
        return found.group(1).decode()
    return str(headers.get("x-worker-id", "unknown"))


async def _turn(
    client: httpx.AsyncClient, trace: Trace, session: Session, turn: int, results: Results
) -> None:
    body = {
        "model": MODEL,
        "messages": trace.messages(session, turn),
        "max_tokens": session.turns[turn].max_tokens,
        "stream": True,
    }
    headers = {"x-session-id": f"session-{trace.seed}-{session.number}"}
    began = trio.current_time()
    first: float | None = None
    head = b""
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=headers
        ) as response:
            async for chunk in response.aiter_raw():
                if first is None and chunk:
                    first = trio.current_time() - began
                if len(head) < 4096:
                    head += chunk[:4096]
            if response.status_code != 200:
                results.errors[f"status {response.status_code}"] += 1
                return
            ended = trio.current_time() - began
            answer = response.headers
    except httpx.HTTPError as exc:
        results.errors[type(exc).__name__] += 1
        return
    if first is None:
        results.errors["empty answer"] += 1
        return
    results.ttft.append(first)
    results.e2e.append(ended)
    results.per_worker[_worker_of(answer, head)] += 1
    try:
        results.prompt_tokens += int(answer["x-prompt-tokens"])
        results.cached_tokens += int(answer["x-cached-tokens"])
        results.queue_ms.append(float(answer["x-queue-ms"]))
    except (KeyError, ValueError):
        results.without_cache_headers += 1


async def _session(
    client: httpx.AsyncClient, trace: Trace, session: Session, t0: float, results: Results
) -> None:
    await trio.sleep_until(t0 + session.start_secs)
    for i, turn in enumerate(session.turns):
        await trio.sleep(turn.think_secs)
        await _turn(client, trace, session, i, results)


async def replay(gateway: str, trace: Trace) -> tuple[Results, float]:
    """Replay ``trace`` against ``gateway``; the results and the wall time of the run."""
    results = Results()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(
        base_url=gateway, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for session in trace.sessions:
                nursery.start_soon(_session, client, trace, session, t0, results)
        return results, trio.current_time() - t0


def figures(results: Results, wall: float) -> dict[str, Any]:
    answered = len(results.ttft)
    counts = sorted(results.per_worker.values())
    mean = sum(counts) / len(counts) if counts else 0.0
    hit = results.cached_tokens / results.prompt_tokens if results.prompt_tokens else None
    return {
        "turns": answered,
        "hit_rate": None if hit is None else round(hit, 4),
        "ttft_ms": {"p50": percentile_ms(results.ttft, 50), "p99": percentile_ms(results.ttft, 99)},
        "e2e_ms": {"p50": percentile_ms(results.e2e, 50), "p99": percentile_ms(results.e2e, 99)},
        "worker_queue_ms": {
            "p50": percentile_ms([q / 1000 for q in results.queue_ms], 50),
            "p99": percentile_ms([q / 1000 for q in results.queue_ms], 99),
        },
        "turns_per_sec": round(answered / wall, 2) if wall else None,
        "wall_secs": round(wall, 2),
        "requests_per_worker": dict(sorted(results.per_worker.items())),
        "imbalance": round(counts[-1] / mean, 3) if mean else None,
        "errors": dict(results.errors),
        "answers_without_cache_headers": results.without_cache_headers,
    }


# ---- gateways ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SmgChild(Child):
    """smg (``smg launch``) on a free port with the workers given at start; ready once it lists
    every worker as healthy."""

    def __init__(self, binary: str, policy: str, urls: list[str], log: IO[bytes]) -> None:
        self.port = free_port()
        command = [binary, "launch", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--policy", policy, "--worker-urls", *urls, "--log-level", "warn"]
        command += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        super().__init__(f"smg ({policy})", command, log)
        self.expected = len(urls)

    async def start(self) -> Any:
        self.process = await trio.lowlevel.open_process(
            self.command, cwd=ROOT, stdout=self.log, stderr=self.log
        )
        url = f"http://127.0.0.1:{self.port}"
        await wait_workers_ready(url, self.expected, self.process)
        return url


async def wait_workers_ready(url: str, expected: int, process: trio.Process | None) -> None:
    """Poll ``GET /workers`` until ``expected`` workers are ready (TooSlowError after a minute)."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=5.0) as client:
        with trio.fail_after(READY_TIMEOUT):
            while True:
                if process is not None and process.returncode is not None:
                    raise RuntimeError(f"the gateway exited ({process.returncode})")
                try:
                    response = await client.get("/workers")
                    listed = response.json().get("workers", [])
                    ready = [w for w in listed if worker_state(w) == "ready"]
                    if len(ready) >= expected:
                        return
                except (httpx.HTTPError, ValueError, AttributeError):
                    pass
                await trio.sleep(0.2)


async def register_workers(url: str, addresses: list[str]) -> list[str]:
    """POST every address to ``url``'s ``/workers``; their ids (for the cleanup)."""
    ids = []
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10.0) as client:
        for address in addresses:
            response = await client.post("/workers", json={"url": address})
            if response.status_code != 202:
                raise RuntimeError(f"POST /workers {address}: {response.status_code}")
            ids.append(str(response.json().get("worker_id")))
    return ids


async def remove_workers(url: str, ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10.0) as client:
        for worker_id in ids:
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"/workers/{worker_id}")


def refusal(log: IO[bytes]) -> str:
    """The last meaningful line of a child's stderr (argparse's 'invalid choice' line)."""
    log.seek(0)
    lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "exited without a message"


def fake_options(args: argparse.Namespace) -> list[str]:
    return [
        "--cache-blocks",
        str(args.cache_blocks),
        "--block-tokens",
        str(args.block_tokens),
        "--prefill-ms-per-token",
        str(args.prefill_ms_per_token),
        "--decode-ms-per-token",
        str(args.decode_ms_per_token),
        "--prefill-slots",
        str(args.prefill_slots),
        "--slots",
        str(args.slots),
    ]


async def run_one(
    args: argparse.Namespace, gateway_kind: str, policy: str, load: str, seed: int
) -> dict[str, Any]:
    """One run on a fresh fleet (cold caches) and, unless ``--gateway``, a fresh gateway."""
    sessions = session_count(load, args.duration)
    trace = make_trace(seed, sessions, args.duration, prompts=args.prompts, think_secs=args.think)
    line: dict[str, Any] = {
        "benchmark": "bench_routing",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cores": os.cpu_count(),
        "gateway": gateway_kind,
        "policy": policy,
        "load": load,
        "seed": seed,
        "sessions": sessions,
        "trace_turns": sum(len(s.turns) for s in trace.sessions),
        "hot_prompts": list(trace.hot),
        "oracle_hit_rate": round(oracle_hit_rate(trace, args.block_tokens), 4),
        "workers": args.workers,
        "fleet": " ".join(fake_options(args)),
    }
    with tempfile.TemporaryFile() as fake_log, tempfile.TemporaryFile() as gateway_log:
        children = [
            Child("fake_worker", fake_worker_command(args.workers, *fake_options(args)), fake_log)
        ]
        ids: list[str] = []
        gateway = args.gateway
        ok = False
        try:
            ports = await children[0].start()
            addresses = [f"127.0.0.1:{port}" for port in ports]
            if gateway_kind == "smg":
                urls = [f"http://{a}" for a in addresses]
                smg = SmgChild(args.smg_binary, policy, urls, gateway_log)
                children.append(smg)
                gateway = await smg.start()
            else:
                if gateway is None:
                    ours = Child(
                        f"gateway ({policy})", gateway_command("--policy", policy), gateway_log
                    )
                    children.append(ours)
                    try:
                        gateway = await ours.start()
                    except RuntimeError:
                        await ours.stop()
                        return line | {"skipped": refusal(gateway_log)}
                ids = await register_workers(gateway, addresses)
                await wait_workers_ready(gateway, len(addresses), None)
            results, wall = await replay(gateway, trace)
            ok = not results.errors
            return line | figures(results, wall)
        except RUN_FAILURES as e:
            return line | {"failed": f"{type(e).__name__}: {e}"}
        finally:
            if ids and args.gateway is not None:
                with trio.CancelScope(shield=True):
                    await remove_workers(args.gateway, ids)
            for child in reversed(children):
                await child.stop()
            if not ok and args.verbose:
                for child in children:
                    child.show_log()


def side_by_side(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per gateway/policy, one column per load/seed: hit rate and TTFT p99."""
    table: dict[str, Any] = {"benchmark": "bench_routing_compare"}
    for line in lines:
        row = table.setdefault(f"{line['gateway']}:{line['policy']}", {})
        key = f"{line['load']}/seed{line['seed']}"
        if "skipped" in line or "failed" in line:
            row[key] = line.get("skipped") or line.get("failed")
            continue
        row[key] = {
            "hit": line["hit_rate"],
            "oracle": line["oracle_hit_rate"],
            "ttft_p50": line["ttft_ms"]["p50"],
            "ttft_p99": line["ttft_ms"]["p99"],
            "e2e_p50": line["e2e_ms"]["p50"],
            "imbalance": line["imbalance"],
            "errors": sum(line["errors"].values()),
        }
    return table


async def main(args: argparse.Namespace) -> int:
    runs: list[tuple[str, str, str, int]] = []
    if args.compare:
        for load in COMPARE_LOADS:
            for seed in COMPARE_SEEDS:
                for policy in COMPARE_POLICIES:
                    runs.append(("tmg" if args.gateway is None else "given", policy, load, seed))
                if args.smg_binary:
                    runs.append(("smg", args.smg_policy, load, seed))
    elif args.smg_binary:
        runs.append(("smg", args.policy, args.sessions, args.seed))
    else:
        runs.append(
            ("tmg" if args.gateway is None else "given", args.policy, args.sessions, args.seed)
        )
    lines = []
    for kind, policy, load, seed in runs:
        line = await run_one(args, kind, policy, load, seed)
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.compare:
        print(json.dumps(side_by_side(lines)), flush=True)
    return 0 if all("failed" not in line and not line.get("errors") for line in lines) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateway", help="a running gateway's URL (else ours is started per run)")
    p.add_argument("--smg-binary", metavar="PATH", help="start smg (smg launch) instead of ours")
    p.add_argument("--smg-policy", default="cache_aware", help="smg's policy in --compare")
    p.add_argument("--policy", default="cache_aware", help="the gateway's --policy")
    p.add_argument("--sessions", default="1x", help="load: 1x, 2x, ... or a number of sessions")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--duration", type=float, default=20.0, help="seconds over which sessions arrive"
    )
    p.add_argument("--think", type=float, default=1.5, help="mean think time between turns, s")
    p.add_argument("--prompts", type=int, default=12, help="shared system prompts")
    p.add_argument("--compare", action="store_true", help="policies x loads x seeds, side by side")
    p.add_argument("--verbose", action="store_true", help="show children's stderr on errors")
    fleet = p.add_argument_group("the fleet (passed to fake_worker.py)")
    fleet.add_argument("--workers", type=int, default=8)
    fleet.add_argument("--cache-blocks", type=int, default=256)
    fleet.add_argument("--block-tokens", type=int, default=16)
    fleet.add_argument("--prefill-ms-per-token", type=float, default=1.0)
    fleet.add_argument("--decode-ms-per-token", type=float, default=20.0)
    fleet.add_argument("--prefill-slots", type=int, default=1)
    fleet.add_argument("--slots", type=int, default=4)
    args = p.parse_args(argv)
    try:
        session_count(args.sessions, args.duration)
    except ValueError as exc:
        p.error(f"--sessions: {exc}")
    if args.gateway and args.smg_binary:
        p.error("--gateway and --smg-binary exclude each other")
    return args


if __name__ == "__main__":
    run_orchestrator("bench_routing", main, parse_args())
