"""``tmg serve --processes N``: one supervisor and N gateway processes on one port.

One gateway process uses one core. The supervisor starts N of them (``auto``: one per core the
process may run on), each a replica sharing one registry, all listening on the same port with
``SO_REUSEPORT`` (the kernel spreads new connections over them):

* **The registry.** With ``--state postgresql://...`` they share that database; with ``--state
  FILE`` they share the SQLite file (``--shared-state``: numbered changes, polled); with no
  ``--state``, a private SQLite file in a temporary folder, deleted when the supervisor exits,
  so the registry is still forgotten on restart as a single gateway's would be. Everything the
  replicas promise holds between these processes (actors/registry/replicas.py): a management
  request is read-your-writes on the process that answered it and visible on the others within
  the feed's latency; ids are never reused; work is done once.
* **The port.** The supervisor binds the port first (``SO_REUSEPORT``, not listening: it takes
  no connections), so ``--port 0`` resolves to one port for all and the port stays reserved
  while a process restarts. Each process also listens on a port of its own (``--own-port``),
  which is how each one's ``/metrics`` is scraped: every series carries ``process="<i>"``.
* **Start.** The supervisor prints one JSON line once every process listens: ``{"listening":
  url, "processes": [{"index", "pid", "url"}...]}``, then one ``{"restarted": {...}}`` line per
  restart. If a process cannot start (it exits before it listens), the others are stopped and
  the supervisor exits 1.
* **Restarts.** A process that dies is started again after a backoff (0.5 s doubling to 30 s,
  back to the start once it ran 30 s), under the same replica name, so any job it left is taken
  over at once (``join``).
* **Stop.** SIGTERM or SIGINT (from the start, also while the processes start) is passed on to
  every process, which stops gracefully (requests in flight, streams included, finish within
  ``--shutdown-grace-secs``); the supervisor waits for them (SIGKILL after the grace and a
  margin) and exits 0. A supervisor killed with SIGKILL leaves its processes running (they
  are ordinary replicas; stop them by their pids). ``prctl(PR_SET_PDEATHSIG)`` would tie them
  to it, but trio starts processes from a worker thread, and the signal follows that thread,
  which the thread cache ends when idle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from actors.store.base import is_postgres_url
from actors.store.postgres import redact

log = logging.getLogger("tmg.supervisor")
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECS = 60.0
STOP_MARGIN_SECS = 5.0
BACKOFF_INITIAL_SECS = 0.5
BACKOFF_MAX_SECS = 30.0
STABLE_SECS = 30.0  # a process that ran this long starts its backoff again from the beginning
MEMORY = ":memory:"


class StartFailed(Exception):
    """A gateway process exited (or said nothing) before it listened."""


def process_count(value: str) -> int:
    """``--processes``: a number from 1, or ``auto`` (the cores this process may run on)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or auto, not {value!r}") from None
    if not 1 <= count <= 256:
        raise argparse.ArgumentTypeError(f"must be from 1 to 256, not {count}")
    return count


def without_processes(argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``--processes`` option taken out (both spellings)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            kept.append(arg)
    return kept


@dataclass
class Child:
    index: int
    command: list[str]
    process: trio.Process | None = None
    url: str | None = None
    starts: int = 0

    def describe(self) -> dict[str, Any]:
        pid = None if self.process is None else self.process.pid
        return {"index": self.index, "pid": pid, "url": self.url}


@dataclass
class Supervisor:
    children: list[Child]
    grace_secs: float
    stopping: bool = False
    failed: list[str] = field(default_factory=list)

    async def run_child(
        self, child: Child, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        failures = 0
        while True:
            started_at = trio.current_time()
            try:
                await self._start(child)
            except StartFailed as error:
                if child.starts == 0:
                    raise
                if self.stopping:  # SIGTERM reached it before it listened
                    return
                log.error("process %d: %s", child.index, error)
            else:
                if child.starts == 0:
                    task_status.started()
                else:
                    log.warning("process %d restarted (pid %s)", child.index, child.describe())
                    print(json.dumps({"restarted": child.describe()}), flush=True)
                child.starts += 1
                assert child.process is not None
                code = await child.process.wait()
                if self.stopping:
                    return
                log.error(
                    "process %d (pid %d) exited with %s", child.index, child.process.pid, code
                )
            if trio.current_time() - started_at >= STABLE_SECS:
                failures = 0
            failures += 1
            delay = min(BACKOFF_INITIAL_SECS * 2 ** (failures - 1), BACKOFF_MAX_SECS)
            await trio.sleep(delay)
            if self.stopping:
                return

    async def _start(self, child: Child) -> None:
        process = await trio.lowlevel.open_process(
            child.command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        child.process = process
        assert process.stdout is not None
        line = b""
        try:
            with trio.move_on_after(START_TIMEOUT_SECS):
                while not line.endswith(b"\n"):
                    chunk = await process.stdout.receive_some(4096)
                    if not chunk:
                        break
                    line += chunk
            await process.stdout.aclose()
            if not line.endswith(b"\n"):
                raise StartFailed(f"process {child.index} exited or stalled before it listened")
            urls = json.loads(line)
            child.url = urls.get("own") or urls["listening"]
        except BaseException:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            raise

    async def stop_all(self) -> None:
        """SIGTERM to every process, then wait (SIGKILL after the grace and a margin)."""
        self.stopping = True
        running = [c.process for c in self.children if c.process and c.process.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.grace_secs + STOP_MARGIN_SECS):
                for process in running:
                    await process.wait()
            for process in running:
                if process.returncode is None:
                    log.error("process pid %d ignored SIGTERM: killing it", process.pid)
                    process.kill()
                    await process.wait()


def child_commands(
    args: argparse.Namespace, argv: Sequence[str], count: int, port: int, state: list[str]
) -> list[list[str]]:
    base = args.instance_id or secrets.token_hex(4)
    common = [sys.executable, "-m", "api.cli", *without_processes(argv)]
    return [
        [
            *common,
            "--port",
            str(port),
            "--reuse-port",
            "--own-port",
            *state,
            "--instance-id",
            f"{base}-{index}",
            "--process-label",
            str(index),
        ]
        for index in range(count)
    ]


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening ``SO_REUSEPORT`` socket holding the port for the processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock


async def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``args.processes`` gateway processes until SIGTERM/SIGINT; the exit status."""
    count: int = args.processes
    folder: str | None = None
    state: list[str] = []
    shown_state = args.state
    if is_postgres_url(args.state):
        shown_state = redact(args.state)
    elif args.state == MEMORY:
        folder = tempfile.mkdtemp(prefix="tmg-registry-")
        shown_state = str(Path(folder) / "registry.db")
        state = ["--state", shown_state, "--shared-state"]
    else:
        state = ["--shared-state"]
    try:
        with reserve_port(args.host, args.port) as reserved:
            port = reserved.getsockname()[1]
            commands = child_commands(args, argv, count, port, state)
            supervisor = Supervisor(
                [Child(i, c) for i, c in enumerate(commands)], args.shutdown_grace_secs
            )
            return await _run(supervisor, args, port, shown_state)
    except OSError as error:
        print(f"tmg serve: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


async def _run(supervisor: Supervisor, args: argparse.Namespace, port: int, state: str) -> int:
    # signals are ours from the start (a SIGTERM while the processes start stops them all), and
    # the receiver stays open while they stop: a second signal is not fatal
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                stop = trio.Event()

                async def wait_for_signal() -> None:
                    async for signum in signals:
                        log.info("received %s: stopping every process", signal.Signals(signum).name)
                        stop.set()
                        return

                nursery.start_soon(wait_for_signal)
                with trio.CancelScope() as starting:
                    nursery.start_soon(_cancel_when, stop, starting)
                    try:
                        for child in supervisor.children:  # one by one: the first makes the schema
                            await nursery.start(supervisor.run_child, child)
                    except StartFailed as error:
                        print(f"tmg serve: {error}", file=sys.stderr)
                        supervisor.failed.append(str(error))
                        nursery.cancel_scope.cancel()
                        return 1
                    _announce(supervisor, args, port, state)
                    await stop.wait()
                await supervisor.stop_all()
                nursery.cancel_scope.cancel()
        finally:
            await supervisor.stop_all()
    return 0


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _announce(supervisor: Supervisor, args: argparse.Namespace, port: int, state: str) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    listening = {
        "listening": f"http://{host}:{port}",
        "processes": [child.describe() for child in supervisor.children],
        "state": state,
    }
    log.info("%d gateway processes listening on %s", len(supervisor.children), listening)
    print(json.dumps(listening), flush=True)
