#!/usr/bin/env python3
"""Benchmark: the data plane's latency, throughput and CPU per request, with one command.

Starts one fake-worker process (2 fast ports, no latency) and one gateway process (``python -m
api.cli serve --port 0``), registers both fake workers through ``POST /workers`` and waits until
``GET /workers`` shows both ready, then runs ``scripts/loadtest.py --mode inference`` for every
(stream, connections, target) combination: target = one fake worker directly (``--server-pid`` of
the fake-worker process) or the gateway (``--server-pid`` of the gateway), stream = false or true
(``max_tokens`` 10: 10 SSE chunks and ``[DONE]``). Each run's JSON line is relayed unchanged; a
last ``inference_summary`` line gives, per stream mode, the latency the gateway adds at 1
connection (p50 through it minus p50 direct), the req/s at 32 connections and the gateway's CPU ms
per request (at 32 connections, and by connection count). Both processes are stopped at the end
(SIGTERM, then SIGKILL after a timeout), also on error, Ctrl-C or SIGTERM. Children's stderr is
shown only when something failed.

    .venv/bin/python scripts/bench_inference.py [--duration 5] [--connections 1,32,128]
        [--only gateway|direct] [--server http1|hypercorn]

``--server`` is passed to the gateway process (``tmg serve --server``): compare the servers.

``--processes 1,2`` runs one gateway per count side by side (``tmg serve --processes N``: N
gateway processes on one port), its runs interleaved with the others', each measured with the
CPU of all its gateway processes (``gateway_cpu``), the fake worker's (``worker_cpu``) and the
load generator's (``client_cpu``) per request; the summary then gives, per stream mode and
connection count, the req/s of each count and the ratio to 1 process. Targets are named
``gateway`` for one process and ``gateway_Np`` for N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from typing import Any

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
    stop_children,
)

MODEL = "fake-model"  # the fake worker's default
MAX_TOKENS = 10
READY_TIMEOUT = 30.0
Key = tuple[str, bool, int]  # (target, stream, connections)


async def register_workers(gateway: str, ports: list[int]) -> None:
    """POST each fake worker to the gateway, then poll GET /workers until all of them are ready."""
    async with httpx.AsyncClient(base_url=gateway, trust_env=False, timeout=10) as client:
        for port in ports:
            response = await client.post("/workers", json={"url": f"127.0.0.1:{port}"})
            if response.status_code != 202:
                raise RuntimeError(f"POST /workers {port}: {response.status_code} {response.text}")
        with trio.fail_after(READY_TIMEOUT):
            while True:
                workers = (await client.get("/workers")).json()["workers"]
                states = [worker.get("status") for worker in workers]
                if "failed" in states:
                    raise RuntimeError(f"a fake worker failed to register: {workers}")
                if len(states) == len(ports) and set(states) == {"ready"}:
                    return
                await trio.sleep(0.05)


async def loadtest(
    args: argparse.Namespace,
    url: str,
    pids: list[int],
    stream: bool,
    connections: int,
    worker_pids: list[int],
) -> tuple[dict[str, Any], bool]:
    """One loadtest.py run, its JSON line relayed to stdout: (its figures, whether it passed)."""
    command = [
        sys.executable,
        "scripts/loadtest.py",
        "--mode",
        "inference",
        "--url",
        url,
        "--connections",
        str(connections),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--model",
        MODEL,
        "--max-tokens",
        str(MAX_TOKENS),
        "--server-pid",
        ",".join(map(str, pids)),
        *(["--worker-pid", ",".join(map(str, worker_pids))] if pids != worker_pids else []),
        *(["--stream"] if stream else []),
    ]
    result = await trio.run_process(
        command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
    )
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    try:
        figures: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        figures = {}
    if result.returncode != 0 or not figures:
        what = f"{url} stream={stream} connections={connections}"
        sys.stderr.write(f"--- loadtest {what} exited {result.returncode} ---\n")
        sys.stderr.write(result.stderr.decode(errors="replace") + "\n")
    return figures, result.returncode == 0 and bool(figures)


def by_processes(args: argparse.Namespace, runs: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    """Per stream mode and connection count: each process count's req/s, its ratio to one
    process, and the CPU ms per request of the gateway processes, the worker and the client."""
    table: dict[str, Any] = {}
    for label, stream in (("non_streaming", False), ("streaming", True)):
        for connections in args.connections:
            one = runs.get(("gateway", stream, connections), {}).get("rps")
            row: dict[str, Any] = {}
            for n in args.processes:
                figures = runs.get((target_name(n), stream, connections), {})
                rps = figures.get("rps")
                row[str(n)] = {
                    "rps": rps,
                    "x_one_process": round(rps / one, 2) if rps and one else None,
                    "gateway_cpu_ms": figures.get("server_cpu_ms_per_request"),
                    "worker_cpu_ms": figures.get("worker_cpu_ms_per_request"),
                    "client_cpu_ms": figures.get("client_cpu_ms_per_request"),
                }
            table[f"{label}_at_{connections}"] = row
    return table


def summary(
    args: argparse.Namespace,
    runs: dict[Key, dict[str, Any]],
    ok: bool,
    load_before: tuple[float, ...],
) -> dict[str, object]:
    """The figures the data-plane issue asks for (None where a run is missing)."""

    def figure(target: str, stream: bool, connections: int, name: str) -> Any:
        return runs.get((target, stream, connections), {}).get(name)

    def added(name: str, stream: bool) -> float | None:
        through, direct = figure("gateway", stream, 1, name), figure("direct", stream, 1, name)
        return None if through is None or direct is None else round(through - direct, 3)

    modes: dict[str, object] = {}
    cpu = "server_cpu_ms_per_request"
    for label, stream in (("non_streaming", False), ("streaming", True)):
        modes[label] = {
            "added_p50_ms_at_1": added("p50_ms", stream),
            "added_ttfb_p50_ms_at_1": added("ttfb_p50_ms", stream),
            "gateway_rps_at_32": figure("gateway", stream, 32, "rps"),
            "direct_rps_at_32": figure("direct", stream, 32, "rps"),
            "gateway_cpu_ms_per_request": figure("gateway", stream, 32, cpu),
            "gateway_cpu_ms_per_request_by_connections": {
                str(c): figure("gateway", stream, c, cpu) for c in args.connections
            },
        }
    if len(args.processes) > 1:
        modes["by_processes"] = by_processes(args, runs)
    return {
        "benchmark": "inference_summary",
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "cores": os.cpu_count(),
        "server": args.server,
        "seconds_per_run": args.duration,
        **modes,
        "all_runs_ok": ok,
        "load_average_before": load_before,
        "load_average_after": tuple(round(x, 2) for x in os.getloadavg()),
    }


def target_name(processes: int) -> str:
    return "gateway" if processes == 1 else f"gateway_{processes}p"


async def main(args: argparse.Namespace) -> int:
    fake = fake_worker_command(2, "--model", MODEL)
    gateways = {
        target_name(n): gateway_command("--server", args.server, "--processes", str(n))
        for n in args.processes
    }
    targets = ["direct"] if args.only in (None, "direct") else []
    if args.only in (None, "gateway"):
        targets += list(gateways)
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    runs: dict[Key, dict[str, Any]] = {}
    ok = interrupted = False
    sigterm = trio.Event()
    with contextlib.ExitStack() as logs:
        children = [Child("fake_worker", fake, logs.enter_context(tempfile.TemporaryFile()))]
        for name, command in gateways.items():
            if name in targets:
                children.append(Child(name, command, logs.enter_context(tempfile.TemporaryFile())))
        try:
            async with trio.open_nursery() as nursery:  # SIGTERM cancels it: the children stop
                await nursery.start(cancel_on_sigterm, nursery.cancel_scope, sigterm)
                ok = await run_all(args, children, targets, runs)
                nursery.cancel_scope.cancel()  # the signal watcher
            interrupted = sigterm.is_set()
        except RUN_FAILURES as error:
            print(f"bench_inference: {type(error).__name__}: {error}", file=sys.stderr)
        except BaseException:  # Ctrl-C (perhaps in an exception group): stop, show no logs
            interrupted = True
            raise
        finally:
            await stop_children(children, show_logs=not (ok or interrupted))
    print(json.dumps(summary(args, runs, ok and not interrupted, load_before)), flush=True)
    return 143 if interrupted else 0 if ok else 1


async def run_all(
    args: argparse.Namespace, children: list[Child], targets: list[str], runs: dict[Key, Any]
) -> bool:
    """Start the children, register the fake workers, run every loadtest; True if all passed."""
    ports: list[int] = await children[0].start()
    urls = {"direct": f"http://127.0.0.1:{ports[0]}"}
    pids = {"direct": [_pid(children[0])]}
    for child in children[1:]:
        urls[child.name] = await child.start()
        await register_workers(urls[child.name], ports)
        processes = child.started.get("processes")  # tmg serve --processes N: the N pids
        pids[child.name] = [p["pid"] for p in processes] if processes else [_pid(child)]
    ok = True
    for stream in (False, True):
        for connections in args.connections:
            for target in targets:  # interleaved: a drifting background load hits all alike
                figures, passed = await loadtest(
                    args, urls[target], pids[target], stream, connections, pids["direct"]
                )
                runs[target, stream, connections] = figures
                ok = ok and passed
    return ok


async def cancel_on_sigterm(
    scope: trio.CancelScope,
    sigterm: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On SIGTERM: set ``sigterm`` and cancel ``scope``."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            print("bench_inference: SIGTERM: stopping its children", file=sys.stderr)
            sigterm.set()
            scope.cancel()
            return


def _pid(child: Child) -> int:
    assert child.process is not None
    return child.process.pid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--duration", type=float, default=5.0, help="measured seconds of each run")
    add("--warmup", type=float, default=1.0, help="seconds before each run's measurement")
    add("--connections", default="1,32,128", help="comma list of connection counts")
    add("--only", choices=("gateway", "direct"), default=None, help="run one target only")
    add("--server", choices=("http1", "hypercorn"), default="http1", help="the gateway's server")
    add("--processes", default="1", help="comma list of gateway process counts, side by side")
    args = parser.parse_args()
    try:
        args.connections = [int(n) for n in args.connections.split(",")]
    except ValueError:
        parser.error(f"--connections {args.connections!r}: a comma list of integers")
    if not args.connections or min(args.connections) < 1:
        parser.error("--connections: each count must be at least 1")
    try:
        args.processes = [int(n) for n in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes {args.processes!r}: a comma list of integers")
    if (
        not args.processes
        or min(args.processes) < 1
        or len(set(args.processes)) != len(args.processes)
    ):
        parser.error("--processes: distinct counts, each at least 1")
    return args


if __name__ == "__main__":
    run_orchestrator("bench_inference", main, parse_args())
