"""Shared fixtures: a fresh gateway per test, its HTTP API on a real socket, fake workers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from functools import partial

import httpx
import pytest
import trio

from actors import GatewayConfig, open_gateway, worker_spec
from actors.registry.service import Gateway
from api.serve import serve_api
from scripts.fake_worker import FakeWorker, FakeWorkerConfig, serve_fake_workers
from scripts.postgres_server import PostgresServer
from tests import asgi_apps

# Registration retries fast in tests; nothing waits on wall-clock defaults.
FAST = GatewayConfig(backoff_initial_secs=0.001, backoff_max_secs=0.01, recheck_interval_secs=0)

StartWorkers = Callable[..., Awaitable[list[FakeWorker]]]
Open = Callable[..., Awaitable[tuple[Gateway, httpx.AsyncClient]]]


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with open_gateway(FAST) as gateway:
        yield gateway


@pytest.fixture
async def base_url(gateway: Gateway, nursery: trio.Nursery) -> str:
    [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0"))
    assert isinstance(url, str)
    return url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, trust_env=False) as client:
        yield client


@pytest.fixture
def start_workers(nursery: trio.Nursery) -> StartWorkers:
    """``await start_workers(n, model="m", flavor="vllm")`` → n fake workers on fresh ports."""

    async def start(count: int = 1, **knobs: object) -> list[FakeWorker]:
        config = replace(FakeWorkerConfig(), **knobs)  # type: ignore[arg-type]
        workers: list[FakeWorker] = await nursery.start(serve_fake_workers, [0] * count, config)
        return workers

    return start


@pytest.fixture
def app() -> asgi_apps.App:
    """The HTTP/1 server tests' ASGI app (echoes; a few paths misbehave on purpose)."""
    return asgi_apps.App()


@pytest.fixture
async def url(app: asgi_apps.App, nursery: trio.Nursery) -> str:
    """``app`` served by api/http/server.py on port 0."""
    return await asgi_apps.serve(nursery, app)


async def wait_until(gateway: Gateway, condition: Callable[[], bool]) -> None:
    """Wait (bounded by the caller's fail_after) until ``condition`` holds on a snapshot."""
    while not condition():
        await gateway.wait_changed()


@pytest.fixture
async def open_with(nursery: trio.Nursery) -> AsyncIterator[Open]:
    """``gateway, client = await open_with(policy="consistent_hash")``: a gateway of its own."""
    clients: list[httpx.AsyncClient] = []

    async def start(**config: object) -> tuple[Gateway, httpx.AsyncClient]:
        gateway: Gateway = await nursery.start(_run_gateway, replace(FAST, **config))  # type: ignore[arg-type]
        [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0"))
        client = httpx.AsyncClient(base_url=url, trust_env=False, timeout=10)
        clients.append(client)
        return gateway, client

    yield start
    for client in clients:
        await client.aclose()


async def _run_gateway(config: object, *, task_status: trio.TaskStatus[Gateway]) -> None:
    async with open_gateway(config) as gateway:  # type: ignore[arg-type]
        task_status.started(gateway)
        await trio.sleep_forever()


async def register(gateway: Gateway, ports: list[int], **fields: object) -> list[str]:
    ids = []
    for port in ports:
        worker = await gateway.add_worker(worker_spec(f"127.0.0.1:{port}", **fields))
        await gateway.wait_status(worker.id, "ready", 5)
        ids.append(worker.id)
    return ids


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With TMG_MIN_TESTS set (the README's test command sets it), a run that collected fewer
    tests than that fails, so a collection mistake can never pass as green."""
    minimum = int(os.environ.get("TMG_MIN_TESTS", "0"))
    if minimum and session.testscollected < minimum:
        print(f"\nonly {session.testscollected} tests collected; expected at least {minimum}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---- PostgreSQL: one private server per test session (scripts/postgres_server.py) ----------


class _GivenServer:
    """TMG_TEST_POSTGRES_URL: an existing server; a database per test is created through it."""

    def __init__(self, url: str) -> None:
        self.admin_url = url
        self._count = 0

    def create_database(self) -> str:
        import psycopg

        self._count += 1
        name = f"tmg_test_{os.getpid()}_{self._count}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | _GivenServer]:
    """Never skipped: without PostgreSQL installed (``make test`` installs it) this errors."""
    given = os.environ.get("TMG_TEST_POSTGRES_URL")
    if given:
        yield _GivenServer(given)
        return
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer | _GivenServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()
