"""The long-poll GET /workers/{id}?wait_for=<status>&timeout_secs=N (api/longpoll.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from actors import open_gateway, worker_spec
from actors.core.errors import WorkerNotFound
from actors.core.model import Detection, WorkerSpec, WorkerStatus
from actors.core.urls import WorkerUrl
from actors.registry.service import Gateway
from api.longpoll import wait_for_status
from api.serve import serve_api
from tests.conftest import FAST
from tests.specs import detection


class Gate:
    """Detection that waits until the test opens the gate."""

    def __init__(self) -> None:
        self.open = trio.Event()

    async def detect(self, spec: WorkerSpec) -> Detection:
        await self.open.wait()
        return detection(spec.url, "m")

    async def check_health(self, spec: WorkerSpec, url: WorkerUrl) -> str | None:
        return None


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def gated(gate: Gate) -> AsyncIterator[Gateway]:
    async with open_gateway(FAST, detector=gate) as gateway:
        yield gateway


@pytest.fixture
async def http(gated: Gateway, nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    [url] = await nursery.start(partial(serve_api, gated, bind="127.0.0.1:0"))
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:
        yield client


async def test_the_answer_leaves_in_the_same_instant_as_the_change(
    autojump_clock: trio.testing.MockClock, gated: Gateway, gate: Gate
) -> None:
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))
    answers: list[tuple[str, float, bool]] = []

    async def poll() -> None:
        found, timed_out = await wait_for_status(gated, worker.id, WorkerStatus.READY, 300)
        answers.append((found.status.value, trio.current_time(), timed_out))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(3)  # virtual time (under detection's 5 s): the poll waits
        assert answers == []
        changed_at = trio.current_time()
        gate.open.set()
    assert answers == [("ready", changed_at, False)]  # same virtual instant: no polling delay


async def test_the_timeout_answers_with_the_current_record_and_failed_does_not_end_it(
    autojump_clock: trio.testing.MockClock, gated: Gateway
) -> None:
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))
    start = trio.current_time()
    # the registration times out at 60 s (failed, and it may still come back): waits on
    found, timed_out = await wait_for_status(gated, worker.id, WorkerStatus.READY, 300)
    assert (found.status, timed_out) == (WorkerStatus.FAILED, True)
    assert trio.current_time() - start == pytest.approx(300)


async def test_a_worker_removed_during_the_wait_is_not_found(
    autojump_clock: trio.testing.MockClock, gated: Gateway
) -> None:
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))
    errors: list[Exception] = []

    async def poll() -> None:
        try:
            await wait_for_status(gated, worker.id, WorkerStatus.READY, 300)
        except WorkerNotFound as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.testing.wait_all_tasks_blocked()
        await gated.remove_worker(worker.id)
    assert [type(e) for e in errors] == [WorkerNotFound]


async def test_over_http_the_long_poll_answers_once_the_worker_is_ready(
    gated: Gateway, gate: Gate, http: httpx.AsyncClient
) -> None:
    order: list[str] = []
    answers: list[httpx.Response] = []
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))

    async def poll() -> None:
        answers.append(await http.get(f"/workers/{worker.id}?wait_for=ready&timeout_secs=30"))
        order.append("answered")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            while worker.id not in gated._watchers:  # the handler is waiting on this worker
                await trio.testing.wait_all_tasks_blocked()
            order.append("ready")
            gate.open.set()
    [answer] = answers
    assert order == ["ready", "answered"]
    assert answer.status_code == 200
    assert answer.json()["status"] == "ready"
    assert "x-wait-timed-out" not in answer.headers
    assert answer.headers["etag"] == '"1"'


async def test_over_http_a_status_held_already_answers_at_once_and_timeouts_say_so(
    gated: Gateway, http: httpx.AsyncClient
) -> None:
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))
    with trio.fail_after(10):
        now = await http.get(f"/workers/{worker.id}?wait_for=pending&timeout_secs=300")
        late = await http.get(f"/workers/{worker.id}?wait_for=ready&timeout_secs=0")
        default = await http.get(f"/workers/{worker.id}?wait_for=pending")
    assert now.status_code == 200 and "x-wait-timed-out" not in now.headers
    assert default.status_code == 200
    assert late.status_code == 200
    assert late.headers["x-wait-timed-out"] == "true"
    assert late.json()["status"] == "pending"


async def test_over_http_a_removal_during_the_wait_is_a_404(
    gated: Gateway, http: httpx.AsyncClient
) -> None:
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))
    answers: list[httpx.Response] = []

    async def poll() -> None:
        answers.append(await http.get(f"/workers/{worker.id}?wait_for=ready&timeout_secs=30"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            while worker.id not in gated._watchers:
                await trio.testing.wait_all_tasks_blocked()
            await gated.remove_worker(worker.id)
        missing = await http.get(f"/workers/{worker.id}?wait_for=ready&timeout_secs=5")
    assert [a.status_code for a in answers] == [404]
    assert answers[0].json()["code"] == "WORKER_NOT_FOUND"
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("wait_for=gone", "wait_for"),
        ("wait_for=ready&timeout_secs=301", "timeout_secs"),
        ("wait_for=ready&timeout_secs=-1", "timeout_secs"),
        ("wait_for=ready&timeout_secs=abc", "timeout_secs"),
        ("wait_for=ready&timeout_secs=nan", "timeout_secs"),
        ("wait_for=ready&timeout_secs=inf", "timeout_secs"),
        ("timeout_secs=5", "timeout_secs"),
        ("wait=ready", "wait"),
    ],
)
async def test_over_http_bad_parameters_are_a_400_naming_the_field(
    gated: Gateway, http: httpx.AsyncClient, query: str, field: str
) -> None:
    worker = await gated.add_worker(worker_spec("10.0.0.1:8000"))
    answer = await http.get(f"/workers/{worker.id}?{query}")
    assert answer.status_code == 400
    assert answer.json()["field"] == field
