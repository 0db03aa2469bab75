"""scripts/loadtest.py end to end: a subprocess hammers our gateway and fake workers, both served
from this test's trio loop, over real sockets (ports chosen by the OS)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

import api.serve
from actors import Gateway, open_gateway, worker_spec
from scripts.fake_worker import FakeWorker, FakeWorkerConfig, serve_fake_workers
from scripts.loadtest import percentile_ms, redacted, worker_state

ROOT = Path(__file__).resolve().parent.parent
KEY = "load-test-admin-key"


@asynccontextmanager
async def served(
    count: int, *, admin_api_key: str | None = None
) -> AsyncIterator[tuple[str, list[str], Gateway, list[FakeWorker]]]:
    """Our gateway's HTTP API and ``count`` fake workers: (base URL, worker addresses, handle,
    the fake workers themselves, whose ``counts`` record every request they served)."""
    async with open_gateway() as gateway, trio.open_nursery() as nursery:
        workers = await nursery.start(serve_fake_workers, [0] * count, FakeWorkerConfig())
        serve = functools.partial(
            api.serve.serve_api, gateway, bind="127.0.0.1:0", admin_api_key=admin_api_key
        )
        [url] = await nursery.start(serve)
        yield url, [f"127.0.0.1:{worker.port}" for worker in workers], gateway, workers
        nursery.cancel_scope.cancel()


def detections(workers: list[FakeWorker]) -> int:
    """How many times the gateway read a worker's model list: once per successful detection
    (the gateway answers its own /v1/models from its registry, and health checks ask /health)."""
    return sum(worker.counts["GET /v1/models"] for worker in workers)


async def loadtest(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run scripts/loadtest.py against ``url``: its exit code and its one JSON line."""
    result = await trio.run_process(
        [sys.executable, "scripts/loadtest.py", "--gateway", url, *args],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, (lines, result.stderr.decode())
    figures: dict[str, Any] = json.loads(lines[0])
    return result.returncode, figures


async def test_churn_and_register_cycle_with_no_unexpected_answer() -> None:
    with trio.fail_after(60):
        async with served(3, admin_api_key=KEY) as (url, addresses, gateway, workers):
            leftover = await gateway.add_worker(worker_spec(addresses[0]))  # an earlier run's
            await gateway.wait_status(leftover.id, "ready", 10)
            auth = ("--admin-api-key", KEY)
            churn_code, churn = await loadtest(
                url,
                "--mode",
                "churn",
                "--clients",
                "2",
                "--duration",
                "1",
                *auth,
                "--worker-urls",
                *addresses,
            )
            register_code, register = await loadtest(
                url, "--mode", "register", "--workers", "3", *auth, "--worker-urls", *addresses
            )
            left = gateway.list_workers()
            detected = detections(workers)
    assert churn["benchmark"] == "loadtest_churn" and churn["clients"] == 2
    assert churn["cycles"] > 0 and churn["failed_cycles"] == 0, churn
    # every cycle the script counted was a real registration the workers saw, and no more
    assert detected == 1 + churn["cycles"] + register["samples"], (detected, churn, register)
    assert churn["seconds"] >= 1  # it ran for its --duration (cycles started then finish)
    assert abs(churn["cycles_per_sec"] - churn["cycles"] / churn["seconds"]) <= 0.1
    assert 0 < churn["cycle_p50_ms"] <= churn["cycle_p99_ms"]
    for phase in ("post", "to_ready", "delete", "to_gone"):
        # a phase is part of its cycle, so its percentile is at most the cycle's
        assert 0 < churn[f"{phase}_p50_ms"] <= churn["cycle_p50_ms"], churn
    assert (churn["errors"], churn["unexpected"], churn["leftovers_cleared"]) == ({}, {}, 1)
    assert churn_code == 0
    assert KEY not in churn["command"] and "--admin-api-key ***" in churn["command"]
    assert register["benchmark"] == "loadtest_register"
    assert (register["workers"], register["samples"], register["failed"]) == (3, 3, 0), register
    assert 0 < register["post_to_ready_p50_ms"] <= register["post_to_ready_p99_ms"]
    assert register["post_to_ready_p99_ms"] <= register["post_to_ready_max_ms"]
    assert 0 < register["post_p50_ms"] <= register["post_p99_ms"]
    assert register["post_p99_ms"] <= register["post_to_ready_max_ms"]  # a POST is part of it
    assert register["all_ready_seconds"] > 0 and register["cleanup_seconds"] >= 0
    assert (register["errors"], register["unexpected"]) == ({}, {})
    assert register_code == 0
    assert left == []  # every cycle and the cleanup removed what they added


async def test_a_worker_that_never_becomes_ready_is_a_timeout_and_exit_code_1() -> None:
    with trio.fail_after(60):
        async with served(0) as (url, _, gateway, _workers):
            code, churn = await loadtest(
                url,
                "--mode",
                "churn",
                "--duration",
                "1",
                "--cycle-timeout",
                "0.5",
                "--worker-urls",
                "127.0.0.1:1",
            )
            left = gateway.list_workers()
    assert code == 1
    assert churn["cycles"] == 0 and churn["errors"]["timeout"] >= 1, churn
    assert churn["failed_cycles"] == churn["errors"]["timeout"]
    assert churn["cycles_per_sec"] == 0 and churn["cycle_p50_ms"] is None
    assert left == []  # each timed-out registration was deleted


async def test_unexpected_answers_are_counted_by_status_and_exit_code_1() -> None:
    with trio.fail_after(60):
        async with served(1, admin_api_key=KEY) as (url, addresses, _, workers):
            code, register = await loadtest(  # no admin key: every POST is a 401
                url, "--mode", "register", "--workers", "1", "--worker-urls", *addresses
            )
    assert code == 1
    assert detections(workers) == 0  # refused POSTs registered nothing
    assert register["unexpected"] == {"POST 401": 1}, register
    assert register["samples"] == 0 and register["failed"] == 1


def test_percentiles_are_nearest_rank_on_sorted_samples() -> None:
    samples = [0.005, 0.001, 0.004, 0.002, 0.003]
    assert percentile_ms(samples, 50) == 3.0
    assert percentile_ms(samples, 99) == percentile_ms(samples, 100) == 5.0
    assert percentile_ms(samples, 1) == 1.0
    assert percentile_ms([], 50) is None
    assert percentile_ms([0.007] * 100 + [1.0], 99) == 7.0


def test_the_admin_key_never_reaches_the_printed_command() -> None:
    argv = ["loadtest.py", "--admin-api-key", "s3cret", "--admin-api-key=other", "--mode", "x"]
    shown = ["loadtest.py", "--admin-api-key", "***", "--admin-api-key=***", "--mode", "x"]
    assert redacted(argv) == shown


def test_worker_state_reads_status_or_guesses_it_for_gateways_without_one() -> None:
    assert worker_state({"status": "draining", "is_healthy": True}) == "draining"
    assert worker_state({"is_healthy": True, "job_status": None}) == "ready"
    assert worker_state({"is_healthy": False}) == "pending"
    assert worker_state({"is_healthy": True, "job_status": {"status": "running"}}) == "pending"
    assert worker_state({"job_status": {"status": "failed"}}) == "failed"
