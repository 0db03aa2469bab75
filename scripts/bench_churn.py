#!/usr/bin/env python3
"""Benchmark: the gateway's HTTP churn and registration figures, with one command.

Starts one fake-worker process (109 OS-chosen ports) and one gateway process (``python -m api.cli
serve --port 0``), unless ``--gateway URL`` points at another gateway (smg, for one), then runs
scripts/loadtest.py three times, each on its own worker ports: churn with 1 client, churn with 8
clients (``--duration`` seconds each), register with 100 workers. Each run's JSON line is relayed
to stdout with ``"state"`` added. Both processes are stopped at the end (SIGTERM, then SIGKILL
after a timeout), also on error or Ctrl-C. Children's stderr is shown only when something failed.

``--state`` chooses where our gateway keeps its registry: ``memory`` (``:memory:``), ``file`` (a
SQLite file in a temporary directory) or ``both`` (the default): the three runs against an
in-memory gateway, then against a fresh gateway on a state file, then one ``churn_by_state``
line with the rates side by side and the file's share of the in-memory rate.

    .venv/bin/python scripts/bench_churn.py [--duration 10] [--state both] [--gateway URL]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
RUNS = (("churn", 1), ("churn", 8), ("register", 100))  # (mode, clients or workers)
WORKERS = sum(count for _, count in RUNS)  # distinct ports: no run sees another's leftovers
STATES = {"memory": ("memory",), "file": ("file",), "both": ("memory", "file")}
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# what a benchmark run can fail with that is the run's failure, not a bug in the script
RUN_FAILURES = (OSError, RuntimeError, ValueError, KeyError, httpx.HTTPError, trio.TooSlowError)


def fake_worker_command(count: int, *options: str) -> list[str]:
    """``scripts/fake_worker.py`` on ``count`` OS-chosen ports, with ``options``."""
    return [sys.executable, "scripts/fake_worker.py", "--count", str(count), *options]


def gateway_command(*options: str, python: Sequence[str] = (sys.executable,)) -> list[str]:
    """The gateway on an OS-chosen port, logging warnings only, with ``options``; ``python`` is
    how Python is started (a wrapper may set limits first)."""
    return [*python, "-m", "api.cli", "serve", "--port", "0", "--log-level", "warning", *options]


class Child:
    """A long-running child process whose first stdout line is its JSON ``listening`` line."""

    def __init__(self, name: str, command: list[str], log: IO[bytes]) -> None:
        self.name, self.command = name, command
        self.log = log  # its stderr, shown only on failure
        self.process: trio.Process | None = None
        self.started: Any = None

    async def start(self) -> Any:
        self.process = await trio.lowlevel.open_process(
            self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log
        )
        assert self.process.stdout is not None
        line = b""
        with trio.fail_after(START_TIMEOUT):
            while not line.endswith(b"\n"):
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited before printing its listening line")
                line += chunk
        self.started = json.loads(line)  # the whole line (tmg serve --processes: the pids)
        return self.started["listening"]

    async def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after STOP_TIMEOUT; shielded, so it runs even when cancelled."""
        process = self.process
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
            if process.returncode is None:
                print(f"bench_churn: {self.name} ignored SIGTERM: killing it", file=sys.stderr)
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()

    def show_log(self) -> None:
        self.log.seek(0)
        if text := self.log.read().decode(errors="replace"):
            sys.stderr.write(f"--- {self.name} stderr ---\n{text}\n")


async def run_loadtests(
    args: argparse.Namespace, gateway: str, ports: list[int], state: str, results: list[Any]
) -> bool:
    """Run every loadtest in RUNS on its own slice of ``ports``; True if each exited 0. Each
    run's figures (with ``state``) are printed and appended to ``results``."""
    ok = True
    first = 0
    for mode, count in RUNS:
        addresses = [f"127.0.0.1:{port}" for port in ports[first : first + count]]
        first += count
        command = [sys.executable, "scripts/loadtest.py", "--gateway", gateway, "--mode", mode]
        if mode == "churn":
            command += ["--clients", str(count), "--duration", str(args.duration)]
        else:
            command += ["--workers", str(count)]
        if args.admin_api_key:
            command += ["--admin-api-key", args.admin_api_key]
        result = await trio.run_process(
            [*command, "--worker-urls", *addresses],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        for line in result.stdout.decode().splitlines():
            figures = {**json.loads(line), "state": state}
            results.append(figures)
            print(json.dumps(figures), flush=True)
        if result.returncode != 0:
            ok = False
            stderr = result.stderr.decode(errors="replace")
            sys.stderr.write(f"--- loadtest {mode} {count} exited {result.returncode} ---\n")
            sys.stderr.write(stderr + "\n")
    return ok


async def main(args: argparse.Namespace) -> int:
    states = ("given",) if args.gateway else STATES[args.state]
    fake = fake_worker_command(WORKERS * len(states))
    ok = interrupted = False
    results: list[Any] = []
    with (
        tempfile.TemporaryFile() as fake_log,
        tempfile.TemporaryFile() as serve_log,
        tempfile.TemporaryDirectory() as folder,
    ):
        children = [Child("fake_worker", fake, fake_log)]
        try:
            ports = await children[0].start()
            ok = True
            for n, state in enumerate(states):
                gateway = args.gateway
                if gateway is None:
                    options = ("--state", f"{folder}/state.db") if state == "file" else ()
                    child = Child(f"gateway ({state})", gateway_command(*options), serve_log)
                    children.append(child)
                    gateway = await child.start()
                mine = ports[n * WORKERS : (n + 1) * WORKERS]
                ok = await run_loadtests(args, gateway, mine, state, results) and ok
                if args.gateway is None:
                    await children.pop().stop()
            if len(states) > 1:
                print(json.dumps(side_by_side(results)), flush=True)
        except (OSError, RuntimeError, ValueError, KeyError, trio.TooSlowError) as error:
            print(f"bench_churn: {type(error).__name__}: {error}", file=sys.stderr)
        except BaseException:  # Ctrl-C (perhaps in an exception group): stop, show no logs
            interrupted = True
            raise
        finally:
            await stop_children(children, show_logs=not (ok or interrupted))
    return 0 if ok else 1


def side_by_side(results: list[Any]) -> dict[str, Any]:
    """Churn rates and burst times per state, and the file's share of the in-memory figure."""
    table: dict[str, Any] = {"benchmark": "churn_by_state"}
    for figures in results:
        name = figures["benchmark"].removeprefix("loadtest_")
        if name == "churn":
            key = f"churn{figures['clients']}_cycles_per_sec"
            table.setdefault(key, {})[figures["state"]] = figures["cycles_per_sec"]
        else:
            key = f"burst{figures['workers']}_all_ready_seconds"
            table.setdefault(key, {})[figures["state"]] = figures["all_ready_seconds"]
    for key, by_state in list(table.items()):
        if isinstance(by_state, dict) and {"memory", "file"} <= set(by_state):
            memory, file = by_state["memory"], by_state["file"]
            share = file / memory if key.startswith("churn") else memory / file
            by_state["file_share_of_memory"] = round(share, 3) if memory and file else None
    return table


def run_orchestrator(
    name: str, main: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> NoReturn:
    """``trio.run(main, args)`` and exit with its code; Ctrl-C exits 130 (``main`` stops its
    children on the way out, whatever ends it)."""
    try:
        code = trio.run(main, args)
    except* KeyboardInterrupt:
        print(f"{name}: interrupted; its children were stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


async def stop_children(children: list[Child], *, show_logs: bool) -> None:
    """Stop the gateway first (it may be probing the workers); show their logs on failure."""
    for child in reversed(children):
        await child.stop()
    for child in children if show_logs else []:
        child.show_log()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each churn run")
    parser.add_argument("--gateway", default=None, help="use this gateway instead of starting ours")
    parser.add_argument("--admin-api-key", default=None, help="passed on to loadtest.py")
    parser.add_argument(
        "--state",
        choices=tuple(STATES),
        default="both",
        help="our gateway's registry: in memory, in a temporary SQLite file, or both in turn",
    )
    run_orchestrator("bench_churn", main, parser.parse_args())
