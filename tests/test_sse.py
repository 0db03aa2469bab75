"""GET /workers/events over real sockets (api/events.py), and its heartbeat in virtual time."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest
import trio
import trio.testing

from actors.registry.service import Gateway
from api.app import create_app
from api.events import HEARTBEAT, events_app
from api.inference import CANCEL_ON_DISCONNECT
from tests.conftest import StartWorkers

Event = dict[str, Any]


class Subscriber:
    """Reads one SSE connection into ``events`` ({"id", "event", "data"}); ``wait_for``
    returns once a condition on them holds (woken by each new event, no polling)."""

    def __init__(self, client: httpx.AsyncClient, query: str = "", last_id: str | None = None):
        self.client = client
        self.query = query
        self.last_id = last_id
        self.events: list[Event] = []
        self.status = 0
        self._new = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id is not None else {}
        async with self.client.stream("GET", f"/workers/events{self.query}", headers=headers) as r:
            self.status = r.status_code
            task_status.started()
            block: Event = {}
            async for line in r.aiter_lines():
                if not line:
                    if "event" in block:
                        if "data" in block:
                            block["data"] = json.loads(block["data"])
                        self.events.append(block)
                        self._new.set()
                        self._new = trio.Event()
                    block = {}
                elif not line.startswith(":") and ":" in line:
                    name, _, value = line.partition(":")
                    block[name] = value.removeprefix(" ")

    async def wait_for(self, condition: Callable[[list[Event]], bool]) -> None:
        while not condition(self.events):
            await self._new.wait()

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def changes(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """What a subscriber records of each change (load is live: left out)."""
        return [
            (e["id"], e["event"], e["data"]["id"], {**e["data"], "load": 0})
            for e in self.events
            if "id" in e and e["event"] != "synced"
        ]


def seen(kind: str, worker_id: str | None = None) -> Callable[[list[Event]], bool]:
    return lambda events: any(
        e["event"] == kind and (worker_id is None or e["data"]["id"] == worker_id) for e in events
    )


@pytest.fixture
async def api(base_url: str, nursery: trio.Nursery) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=30)
    nursery.start_soon(_close_later, client)
    return client


async def _close_later(client: httpx.AsyncClient) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def test_two_subscribers_see_the_same_events_in_the_same_order(
    api: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, nursery: trio.Nursery
) -> None:
    [worker] = await start_workers(1, model="m")
    health = {"check_interval_secs": 0.1, "failure_threshold": 1, "success_threshold": 1}
    spec = {"url": f"127.0.0.1:{worker.port}", "health": health}
    one, two = Subscriber(api), Subscriber(api)
    with trio.fail_after(20):
        for subscriber in (one, two):
            await nursery.start(subscriber.run)
            await subscriber.wait_for(seen("synced"))
        posted = await api.post("/workers", json=spec)
        worker_id = posted.json()["worker_id"]
        await one.wait_for(seen("ready", worker_id))
        patched = await api.patch(f"/workers/{worker_id}", json={"priority": 7})
        assert patched.status_code == 200
        put = await api.put(f"/workers/{worker_id}", json={**spec, "labels": {"v": "2"}})
        assert put.status_code == 202
        await one.wait_for(lambda es: any(e["data"]["labels"].get("v") == "2" for e in es[1:]))
        worker.config.fail_health = True
        await one.wait_for(lambda es: any(e["data"].get("is_healthy") is False for e in es[-1:]))
        worker.config.fail_health = False
        await one.wait_for(lambda es: es[-1]["data"].get("is_healthy") is True)
        deleted = await api.delete(f"/workers/{worker_id}")
        assert deleted.status_code == 202
        for subscriber in (one, two):
            await subscriber.wait_for(seen("removed", worker_id))
    assert one.status == two.status == 200
    assert one.changes() == two.changes()
    kinds = one.kinds()
    assert kinds[0] == "synced" and kinds[1] == "created" and kinds[-1] == "removed"
    assert "ready" in kinds and kinds.count("updated") >= 4  # PATCH, PUT swap, health x2
    ids = [int(e["id"]) for e in one.events]
    assert ids == sorted(ids) and len(set(ids[1:])) == len(ids) - 1
    assert one.changes()[-1][3]["id"] == worker_id


async def test_a_reconnect_with_last_event_id_misses_nothing(
    api: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, nursery: trio.Nursery
) -> None:
    workers = await start_workers(3, model="m")
    steady = Subscriber(api)
    with trio.fail_after(20):
        await nursery.start(steady.run)
        first = await api.post("/workers", json={"url": f"127.0.0.1:{workers[0].port}"})
        await steady.wait_for(seen("ready", first.json()["worker_id"]))
        leaving = Subscriber(api)  # a subscriber that connects, reads, then goes away
        async with trio.open_nursery() as inner:
            inner.start_soon(leaving.run)
            await leaving.wait_for(seen("synced"))
            inner.cancel_scope.cancel()
        last_id = [e["id"] for e in leaving.events if "id" in e][-1]
        for port in (workers[1].port, workers[2].port):  # changes while it is away
            await api.post("/workers", json={"url": f"127.0.0.1:{port}"})
        await api.patch(f"/workers/{first.json()['worker_id']}", json={"priority": 3})
        await steady.wait_for(lambda es: sum(e["event"] == "ready" for e in es) == 3)
        back = Subscriber(api, last_id=last_id)
        await nursery.start(back.run)
        await back.wait_for(seen("synced"))
    missed = [c for c in steady.changes() if int(c[0]) > int(last_id)]
    assert missed and back.changes() == missed
    assert back.kinds()[-1] == "synced" and "reset" not in back.kinds()


async def test_an_unknown_last_event_id_gets_reset_and_the_full_state(
    api: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, nursery: trio.Nursery
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(20):
        await api.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
        for last_id in ("1", "not-a-number"):
            subscriber = Subscriber(api, last_id=last_id)
            await nursery.start(subscriber.run)
            await subscriber.wait_for(seen("synced"))
            assert subscriber.kinds()[0] == "reset"
            assert subscriber.kinds()[1] in ("created", "ready")
            assert "id" not in subscriber.events[1]  # initial state: no id (see api/events.py)


async def test_filters_select_workers_and_bad_ones_are_a_400(
    api: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, nursery: trio.Nursery
) -> None:
    one, other = await start_workers(1, model="m"), await start_workers(1, model="x")
    with trio.fail_after(20):
        await api.post("/workers", json={"url": f"127.0.0.1:{one[0].port}"})
        x = await api.post("/workers", json={"url": f"127.0.0.1:{other[0].port}"})
        by_model = Subscriber(api, "?model=x")
        await nursery.start(by_model.run)
        await by_model.wait_for(seen("ready", x.json()["worker_id"]))
        await by_model.wait_for(seen("synced"))
        bad = [
            await api.get(f"/workers/events?{query}")
            for query in ("worker_type=gpu", "model=", "colour=red", "model=a&model=b")
        ]
        post = await api.post("/workers/events")
    assert {e["data"]["id"] for e in by_model.events if "data" in e and "id" in e["data"]} == {
        x.json()["worker_id"]
    }
    assert [b.status_code for b in bad] == [400] * 4
    assert [b.json()["field"] for b in bad] == ["worker_type", "model", "colour", "model"]
    assert post.status_code == 405


async def test_a_subscriber_that_stops_reading_is_dropped_while_writes_keep_going(
    api: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, nursery: trio.Nursery
) -> None:
    feed = gateway.feed
    feed.subscriber_buffer = 8
    [worker] = await start_workers(1, model="m")
    reader = Subscriber(api)
    host, port = str(api.base_url.host), int(api.base_url.port or 80)
    with trio.fail_after(30):
        await nursery.start(reader.run)
        posted = await api.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
        worker_id = posted.json()["worker_id"]
        await reader.wait_for(seen("ready", worker_id))
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it never reads anyway
        await sock.connect((host, port))
        stuck = trio.SocketStream(sock)
        await stuck.send_all(b"GET /workers/events HTTP/1.1\r\nHost: x\r\n\r\n")
        while feed.subscriber_count < 2:
            await trio.testing.wait_all_tasks_blocked()
        big = {f"k{n}": "v" * 4000 for n in range(16)}  # each event is about 64 KiB
        latencies = []
        patches = 0
        while feed.subscriber_count == 2 and patches < 300:
            patches += 1
            started = time.perf_counter()
            answer = await api.patch(
                f"/workers/{worker_id}", json={"labels": {**big, "n": str(patches)}}
            )
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 200
        assert feed.subscriber_count == 1  # the stuck one was dropped, the reader was not
        for n in range(3):  # writes go on as before
            started = time.perf_counter()
            assert (
                await api.post("/workers", json={"url": f"127.0.0.1:{20 + n}"})
            ).status_code == 202
            latencies.append(time.perf_counter() - started)
        await reader.wait_for(lambda es: sum(e["event"] == "created" for e in es) == 4)
        received = b""
        while chunk := await stuck.receive_some(65536):  # what was buffered, then EOF: closed
            received += chunk
        await stuck.aclose()
    assert patches > 8
    assert (
        sum(e["event"] == "updated" and "n" in e["data"]["labels"] for e in reader.events)
        >= patches
    )
    assert received.startswith(b"HTTP/1.1 200")
    assert max(latencies) < 1.0  # generous: no write ever waited for the stuck subscriber


async def test_a_heartbeat_comment_comes_every_15_seconds_without_events(
    autojump_clock: trio.testing.MockClock, gateway: Gateway
) -> None:
    app = events_app(gateway, create_app(gateway))  # type: ignore[arg-type]
    sent: list[tuple[float, bytes]] = []

    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            sent.append((trio.current_time(), message["body"]))

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/workers/events",
        "query_string": b"",
        "headers": [],
        "extensions": {CANCEL_ON_DISCONNECT: {}},
    }
    with trio.move_on_after(46):
        await app(scope, receive, send)
    start = sent[0][0]
    beats = [round(at - start) for at, body in sent if body == HEARTBEAT]
    assert beats == [15, 30, 45]
    assert b"event: synced" in sent[1][1]


async def test_the_openapi_document_describes_both_routes_and_the_event_data(
    api: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, nursery: trio.Nursery
) -> None:
    [worker] = await start_workers(1, model="m")
    with trio.fail_after(20):
        document = (await api.get("/openapi.json")).json()
        posted = await api.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
        subscriber = Subscriber(api)
        await nursery.start(subscriber.run)
        await subscriber.wait_for(seen("ready", posted.json()["worker_id"]))
    events = document["paths"]["/workers/events"]["get"]
    assert {p["name"] for p in events["parameters"]} >= {"model", "worker_type", "Last-Event-ID"}
    one = document["paths"]["/workers/{worker_id}"]["get"]
    assert {p["name"] for p in one["parameters"]} == {"wait_for", "timeout_secs"}
    assert "X-Wait-Timed-Out" in one["responses"]["200"]["headers"]
    schema = events["responses"]["200"]["content"]["text/event-stream"]["x-event-data"]
    for event in subscriber.events:
        jsonschema.validate(
            event["data"],
            {**schema, "components": document["components"]},
            cls=jsonschema.Draft202012Validator,
        )
