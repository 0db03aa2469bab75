#!/usr/bin/env python3
"""Benchmark: gateway replicas on one PostgreSQL database: churn through one replica or spread
over all of them, and how long a change committed on one replica takes to show on another.

Starts a private PostgreSQL server (scripts/postgres_server.py) with a fresh database, one
fake-worker process (OS-chosen ports) and ``--replicas`` gateway processes (``python -m api.cli
serve --port 0 --state postgresql://...``, 3 by default, started together) on that database.

* **Churn**: ``--replicas`` scripts/loadtest.py ``--mode churn`` processes at once, sharing
  ``--clients`` clients, each client on its own worker address, for ``--duration`` seconds: first
  all of them against replica 0 (``one_replica``), then each against a different replica, on
  fresh addresses (``three_replicas`` with 3). Per layout: cycles/s summed over the processes
  (each measures its own window; they start within a second of each other), failed cycles, and
  unexpected answers and errors by kind; each process's figures; and the workers each replica
  still lists afterwards (after waiting up to 10 s for none).
* **Feed latency**: a watch (``GET /workers/events``) on replica 1 (B); ``--feed-samples``
  times, one at a time: POST a worker on a closed port to replica 0 (A) and take the time from
  A's 202 to the first event on B naming its id (``a_202_to_b_event_ms``; the worker stays
  pending, its registration failing to connect), and from the POST's start to that event
  (``a_post_to_b_event_ms``: A's own work included, so never negative); then DELETE it on A
  and take the time from its 202 to B's ``removed`` event. Then ``--routable-samples`` times a
  worker on a fake-worker port (rotating over 3 ports): from A's 202 to the event on B showing
  it ``ready`` (``a_202_to_b_routable_ms``, detection on A included), and from its DELETE's 202
  to B's ``removed`` (a drain that every live replica must record idle). Times are taken in
  this process (one trio loop) as each answer or event is read: B's event can be read before
  A's 202 (a negative sample; ``feed_events_before_202`` counts them).

Before each part (each churn layout, the feed) the script waits, up to ``--settle-timeout``
seconds, until the database's transaction rate (``pg_stat_database``, 2 s windows) is at most
twice its idle rate plus 20/s, so that work the replicas still do for an earlier part does not
slow the next: ``db_transactions_per_sec`` gives the idle rate, the rate each part started at
and the rate after the feed; ``settle_seconds`` how long each wait took.

Prints one JSON line. Every child (gateways first, then the fake workers) is stopped at the end
(SIGTERM, then SIGKILL after a timeout), then the PostgreSQL server, also on error, Ctrl-C or
SIGTERM; children's stderr is shown only when something failed. The line also counts the
warnings and errors each replica logged, with a few examples.

    .venv/bin/python scripts/bench_replicas.py [--duration 10] [--clients 6] [--replicas 3]
        [--feed-samples 200] [--routable-samples 30] [--settle-timeout 45]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from contextlib import ExitStack
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
    stop_children,
)
from scripts.bench_inference import cancel_on_sigterm
from scripts.postgres_server import PostgresServer, PostgresUnavailable
from scripts.replica_feed import ROUTABLE_PORTS, feed_latency

EMPTY_TIMEOUT = 10.0  # seconds the replicas get to list no worker after a churn layout
SETTLE_WINDOW = 2.0  # seconds over which the database's transaction rate is measured
LOADTEST_SLACK = 60.0  # seconds a loadtest process may take beyond --duration
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)$")  # the text log format


def layout_names(replicas: int) -> tuple[str, str]:
    """The two churn layouts' keys: one_replica and, e.g., three_replicas."""
    return "one_replica", f"{NUMBERS.get(replicas, replicas)}_replicas"


def split(total: int, parts: int) -> list[int]:
    """``total`` clients over ``parts`` processes, as evenly as possible."""
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


# ---- the database's load -------------------------------------------------------------------------


def db_commits(url: str) -> int:
    """Transactions the database has ended so far (committed or rolled back)."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


class Quiet:
    """The database's transaction rate, and waiting until it is back near its idle rate: work
    the replicas still do for an earlier part (drains, retries) would slow the next one."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self.rates: dict[str, float] = {}  # transactions/s: idle, then before each part
        self.waited: dict[str, float] = {}  # seconds spent waiting before each part
        self.threshold = 0.0

    async def rate(self) -> float:
        first = await trio.to_thread.run_sync(db_commits, self.url)
        await trio.sleep(SETTLE_WINDOW)
        last = await trio.to_thread.run_sync(db_commits, self.url)
        return round((last - first) / SETTLE_WINDOW, 1)

    async def measure_idle(self) -> None:
        self.rates["idle"] = idle = await self.rate()
        self.threshold = 2 * idle + 20

    async def wait(self, part: str) -> None:
        """Until a window's rate is at most twice the idle one (+20/s), or ``timeout``."""
        started = time.perf_counter()
        rate = await self.rate()
        while rate > self.threshold and time.perf_counter() - started < self.timeout:
            rate = await self.rate()
        self.rates[f"before_{part}"] = rate
        self.waited[part] = round(time.perf_counter() - started - SETTLE_WINDOW, 1)


# ---- churn ---------------------------------------------------------------------------------------


async def run_loadtest(
    gateway: str, replica: int, addresses: list[str], duration: float
) -> dict[str, Any]:
    """One loadtest.py churn process: its figures, with the replica it ran against and its
    exit code (and its stderr when it failed)."""
    command = [
        *(sys.executable, "scripts/loadtest.py", "--gateway", gateway, "--mode", "churn"),
        *("--clients", str(len(addresses)), "--duration", str(duration)),
        *("--worker-urls", *addresses),
    ]
    with trio.fail_after(duration + LOADTEST_SLACK):
        result = await trio.run_process(
            command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    figures: dict[str, Any] = {"replica": replica, "exit_code": result.returncode}
    try:
        line = json.loads(result.stdout.splitlines()[-1])
        figures |= {k: v for k, v in line.items() if k not in ("benchmark", "command", "cores")}
    except (IndexError, ValueError):
        figures["failed"] = "no JSON line"
    if result.returncode != 0 or "failed" in figures:
        figures["stderr"] = result.stderr.decode(errors="replace")[-2000:]
    return figures


async def churn_layout(
    urls: list[str], targets: list[int], addresses: list[str], duration: float
) -> list[dict[str, Any]]:
    """One loadtest process per entry of ``targets`` (a replica's index), all at once, each on
    its own slice of ``addresses``."""
    results: list[dict[str, Any]] = []

    async def one(replica: int, mine: list[str]) -> None:
        results.append(await run_loadtest(urls[replica], replica, mine, duration))

    first = 0
    async with trio.open_nursery() as nursery:
        for replica, clients in zip(targets, split(len(addresses), len(targets)), strict=True):
            if clients:
                nursery.start_soon(one, replica, addresses[first : first + clients])
            first += clients
    return results


async def workers_left(urls: list[str]) -> list[int]:
    """How many workers each replica lists, once every list is empty or EMPTY_TIMEOUT passed."""
    counts = [-1] * len(urls)
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        with trio.move_on_after(EMPTY_TIMEOUT):
            while True:
                for n, url in enumerate(urls):
                    counts[n] = len((await client.get(f"{url}/workers")).json()["workers"])
                if not any(counts):
                    break
                await trio.sleep(0.1)
    return counts


def layout_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Summed cycles/s, failed cycles, and errors and unexpected answers merged by kind."""
    errors: collections.Counter[str] = collections.Counter()
    unexpected: collections.Counter[str] = collections.Counter()
    for run in runs:
        errors.update(run.get("errors", {}))
        unexpected.update(run.get("unexpected", {}))
        if run["exit_code"] != 0 and not run.get("errors") and not run.get("unexpected"):
            errors[f"loadtest exit {run['exit_code']}"] += 1
    return {
        "cycles_per_sec": round(sum(run.get("cycles_per_sec", 0) for run in runs), 1),
        "cycles": sum(run.get("cycles", 0) for run in runs),
        "failed_cycles": sum(run.get("failed_cycles", 0) for run in runs),
        "errors": dict(sorted(errors.items())),
        "unexpected": dict(sorted(unexpected.items())),
    }


async def churn(
    args: argparse.Namespace, urls: list[str], ports: list[int], quiet: Quiet
) -> dict[str, Any]:
    names = layout_names(len(urls))
    layouts = {names[0]: [0] * len(urls), names[1]: list(range(len(urls)))}
    table: dict[str, Any] = {
        "churn_cycles_per_sec": {},
        "churn_failed_cycles": {},
        "churn_errors": {},
        "churn_unexpected": {},
        "churn_workers_left": {},
        "churn_runs": {},
    }
    for n, (name, targets) in enumerate(layouts.items()):
        slice_ = ports[n * args.clients : (n + 1) * args.clients]  # fresh addresses per layout
        addresses = [f"127.0.0.1:{port}" for port in slice_]
        await quiet.wait(name)
        runs = await churn_layout(urls, targets, addresses, args.duration)
        runs.sort(key=lambda run: run["replica"])
        summary = layout_summary(runs)
        table["churn_cycles_per_sec"][name] = summary["cycles_per_sec"]
        table["churn_failed_cycles"][name] = summary["failed_cycles"]
        table["churn_errors"][name] = summary["errors"]
        table["churn_unexpected"][name] = summary["unexpected"]
        table["churn_workers_left"][name] = await workers_left(urls)
        table["churn_runs"][name] = runs
    one, spread = (table["churn_cycles_per_sec"][name] for name in names)
    table["churn_spread_share_of_one"] = round(spread / one, 3) if one else None
    return table


# ---- feed latency --------------------------------------------------------------------------------


def log_summary(log: IO[bytes]) -> dict[str, Any]:
    """A replica's warnings and errors: counts by level and the first few distinct messages."""
    log.seek(0)
    levels: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    for line in log.read().decode(errors="replace").splitlines():
        if (found := LOG_LINE.match(line)) is None:
            continue
        levels[found[1]] += 1
        message = found[2][:300]
        if len(examples) < 5 and message not in examples:
            examples.append(message)
    return {**dict(sorted(levels.items())), "examples": examples} if levels else {}


async def run_all(args: argparse.Namespace, children: list[Child], report: dict[str, Any]) -> bool:
    """Start the children, run both parts into ``report``; True if nothing failed."""
    ports: list[int] = await children[0].start()
    urls: list[str] = [""] * (len(children) - 1)

    async def start(n: int) -> None:
        urls[n] = await children[n + 1].start()

    async with trio.open_nursery() as nursery:  # the replicas start together
        for n in range(len(urls)):
            nursery.start_soon(start, n)
    quiet = Quiet(args.state_url, args.settle_timeout)
    await quiet.measure_idle()
    try:
        report |= await churn(args, urls, ports[: 2 * args.clients], quiet)
        await quiet.wait("feed")
        report |= await feed_latency(args, urls, ports[2 * args.clients :])
        quiet.rates["after_feed"] = await quiet.rate()
    finally:
        report["db_transactions_per_sec"] = quiet.rates
        report["settle_seconds"] = quiet.waited
    clean = ("churn_failed_cycles", "churn_errors", "churn_unexpected")
    churned = all(not any(report[key].values()) for key in clean)
    left = any(any(counts) for counts in report["churn_workers_left"].values())
    fed = not (report["feed_errors"] or report["feed_unexpected"])
    return churned and fed and not left


def header(args: argparse.Namespace) -> dict[str, Any]:
    """The line's first fields: what was run, where, with which settings."""
    return {
        "benchmark": "bench_replicas",
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "cores": os.cpu_count(),
        "replicas": args.replicas,
        "clients": args.clients,
        "duration_s": args.duration,
        "feed_samples": args.feed_samples,
        "routable_samples": args.routable_samples,
        "load_average_before": tuple(round(x, 2) for x in os.getloadavg()),
    }


async def main(args: argparse.Namespace) -> int:
    report = header(args)
    fake = fake_worker_command(2 * args.clients + ROUTABLE_PORTS)
    ok = interrupted = False
    sigterm = trio.Event()
    with ExitStack() as files:
        fake_log = files.enter_context(tempfile.TemporaryFile())
        logs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(args.replicas)]
        children = [Child("fake_worker", fake, fake_log)]
        for n, log in enumerate(logs):
            command = gateway_command("--state", args.state_url, "--instance-id", f"replica-{n}")
            children.append(Child(f"replica-{n}", command, log))
        try:
            async with trio.open_nursery() as nursery:  # SIGTERM cancels it: the children stop
                await nursery.start(cancel_on_sigterm, nursery.cancel_scope, sigterm)
                ok = await run_all(args, children, report)
                nursery.cancel_scope.cancel()  # the signal watcher
            interrupted = sigterm.is_set()
        except RUN_FAILURES as error:
            report["failed"] = f"{type(error).__name__}: {error}"
            print(f"bench_replicas: {report['failed']}", file=sys.stderr)
        except BaseException:  # Ctrl-C (perhaps in an exception group): stop, show no logs
            interrupted = True
            raise
        finally:
            await stop_children(children, show_logs=not (ok or interrupted))
            report["gateway_log"] = {f"replica-{n}": log_summary(log) for n, log in enumerate(logs)}
    report["load_average_after"] = tuple(round(x, 2) for x in os.getloadavg())
    report["all_ok"] = ok and not interrupted
    print(json.dumps(report), flush=True)
    return 143 if interrupted else 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--duration", type=float, default=10.0, help="seconds of each churn layout")
    add("--clients", type=int, default=6, help="churn clients, shared by the loadtest processes")
    add("--replicas", type=int, default=3, help="gateway replicas (and loadtest processes)")
    add("--feed-samples", type=int, default=200, help="pending workers timed A's 202 → B's event")
    add("--routable-samples", type=int, default=30, help="workers timed A's 202 → ready on B")
    add(
        "--settle-timeout",
        type=float,
        default=45.0,
        help="seconds to wait, before each part, for the database to be near its idle rate",
    )
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas: at least 2 (the feed is timed from replica 0 to replica 1)")
    if args.clients < args.replicas:
        parser.error(f"--clients: at least one per replica ({args.replicas})")
    if args.duration <= 0 or args.feed_samples < 1 or args.routable_samples < 1:
        parser.error("--duration, --feed-samples and --routable-samples must be positive")
    if args.settle_timeout < 0:
        parser.error("--settle-timeout: 0 (measure, never wait) or more")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    try:
        with PostgresServer() as server:  # stopped however the run ends (run_orchestrator exits)
            arguments.state_url = server.create_database()
            run_orchestrator("bench_replicas", main, arguments)
    except PostgresUnavailable as error:
        print(f"bench_replicas: {error}", file=sys.stderr)
        sys.exit(1)
