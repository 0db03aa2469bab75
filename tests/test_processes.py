"""`tmg serve --processes 2`: a supervisor and two gateway processes on one port (real
processes, real sockets; SO_REUSEPORT spreads new connections), with each kind of --state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartWorkers

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Supervised:
    """``python -m api.cli serve --processes 2 ...``; its JSON lines as they come."""

    def __init__(self, *options: str) -> None:
        serve = ["serve", "--port", "0", "--processes", "2", "--log-level", "warning"]
        self.command = [sys.executable, "-m", "api.cli", *serve, *options]
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.process: trio.Process | None = None
        self._buffer = b""

    async def start(self) -> dict[str, Any]:
        self.process = await trio.lowlevel.open_process(
            self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log
        )
        with trio.fail_after(60):
            return await self.next_line()

    async def next_line(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the supervisor ended: {self.stderr()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        found: dict[str, Any] = json.loads(line)
        return found

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    async def stop(self) -> int:
        process = self.process
        assert process is not None
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(30):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
        self.log.close()
        assert process.returncode is not None
        return process.returncode


@pytest.fixture(params=["memory", "file", "postgresql"])
def state_options(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    if request.param == "memory":
        return []
    if request.param == "file":
        return ["--state", str(tmp_path / "registry.db")]
    url: str = request.getfixturevalue("postgres_url")
    return ["--state", url]


@pytest.fixture
async def supervised(state_options: list[str]) -> AsyncIterator[tuple[Supervised, dict[str, Any]]]:
    group = Supervised(*state_options)
    started = await group.start()
    try:
        yield group, started
    finally:
        await group.stop()


def still_serving(pid: int, port: str) -> bool:
    """Whether ``pid`` is still a gateway process on ``port`` (pids are reused quickly here:
    the system's pid range is 32,768, and the test suite starts many threads and processes)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--reuse-port" in command and port.encode() in command


def pids(started: dict[str, Any]) -> list[int]:
    return [process["pid"] for process in started["processes"]]


async def test_a_post_then_gets_over_new_connections_spread_over_both_never_404(
    supervised: tuple[Supervised, dict[str, Any]],
) -> None:
    _, started = supervised
    base = started["listening"]
    assert len(set(pids(started))) == 2
    answered_by: set[str] = set()
    with trio.fail_after(60):
        for round_ in range(10):
            async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
                posted = await client.post("/workers", json={"url": f"127.0.0.1:{9000 + round_}"})
                assert posted.status_code == 202, posted.text
                worker_id = posted.json()["worker_id"]
            for _ in range(6):  # each on a new connection: the kernel picks the process
                async with httpx.AsyncClient(base_url=base, trust_env=False) as fresh:
                    found = await fresh.get(f"/workers/{worker_id}")
                    assert found.status_code == 200, found.text
                    answered_by.add(found.headers["x-tmg-gateway"])
    assert len(answered_by) == 2  # both processes answered


async def test_each_process_has_its_own_metrics_labelled_with_its_index(
    supervised: tuple[Supervised, dict[str, Any]],
) -> None:
    _, started = supervised
    with trio.fail_after(30):
        for process in started["processes"]:
            async with httpx.AsyncClient(base_url=process["url"], trust_env=False) as own:
                text = (await own.get("/metrics")).text
            families = list(text_string_to_metric_families(text))
            samples = [sample for family in families for sample in family.samples]
            assert samples
            assert {sample.labels["process"] for sample in samples} == {str(process["index"])}


@pytest.mark.parametrize("state_options", ["postgresql"], indirect=True)
async def test_a_killed_process_is_restarted_and_traffic_continues(
    supervised: tuple[Supervised, dict[str, Any]], start_workers: StartWorkers
) -> None:
    group, started = supervised
    [fake] = await start_workers(1)
    base = started["listening"]
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            posted = await client.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
            worker_id = posted.json()["worker_id"]
            ready = await client.get(
                f"/workers/{worker_id}", params={"wait_for": "ready", "timeout_secs": 20}
            )
            assert ready.json()["status"] == "ready"
        os.kill(started["processes"][0]["pid"], signal.SIGKILL)
        for _ in range(20):  # new connections go to the survivor
            async with httpx.AsyncClient(base_url=base, trust_env=False) as fresh:
                answer = await fresh.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200, answer.text
        restarted = await group.next_line()
        assert restarted["restarted"]["index"] == 0
        assert restarted["restarted"]["pid"] not in pids(started)
        async with httpx.AsyncClient(base_url=restarted["restarted"]["url"]) as again:
            answer = await again.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200, answer.text
            found = await again.get(f"/workers/{worker_id}")
            assert found.json()["status"] == "ready"


@pytest.mark.parametrize("state_options", ["memory"], indirect=True)
async def test_sigterm_stops_every_process_after_the_streams_in_flight_finish(
    state_options: list[str], start_workers: StartWorkers
) -> None:
    [fake] = await start_workers(1, token_delay=0.05)
    group = Supervised(*state_options)
    started = await group.start()
    state_file = Path(started["state"])
    assert state_file.parent.is_dir()  # the private registry of this run
    body = {**CHAT, "stream": True, "max_tokens": 30}
    lines: list[str] = []
    try:
        with trio.fail_after(60):
            base = started["listening"]
            async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as client:
                posted = await client.post("/workers", json={"url": f"127.0.0.1:{fake.port}"})
                worker_id = posted.json()["worker_id"]
                await client.get(
                    f"/workers/{worker_id}", params={"wait_for": "ready", "timeout_secs": 20}
                )
                async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                    async for line in stream.aiter_lines():
                        if line:
                            lines.append(line)
                        if len(lines) == 2 and line:  # once
                            assert group.process is not None
                            group.process.send_signal(signal.SIGTERM)
            assert group.process is not None
            code = await group.process.wait()  # once the stream and everything else ended
    finally:
        await group.stop()
    assert code == 0, group.stderr()
    assert lines[-1] == "data: [DONE]"
    assert sum(line.startswith("data: {") for line in lines) == 30
    port = started["listening"].rsplit(":", 1)[1]
    for process in started["processes"]:
        assert not still_serving(process["pid"], port)
    assert not state_file.parent.exists()  # forgotten, as without --processes


async def test_the_supervisor_exits_1_when_its_processes_cannot_start(tmp_path: Path) -> None:
    missing = tmp_path / "no such folder" / "registry.db"
    group = Supervised("--state", str(missing))
    group.process = await trio.lowlevel.open_process(
        group.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=group.log
    )
    with trio.fail_after(60):
        code = await group.process.wait()
    assert code == 1
    assert "exited or stalled before it listened" in group.stderr()
    assert "does not exist" in group.stderr()  # the process's own reason, on the same stderr
    await group.stop()
