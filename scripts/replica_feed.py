"""Feed latency between gateway replicas, for scripts/bench_replicas.py: a watch on replica B
(``Watch``) and workers POSTed and DELETEd one at a time through replica A (``Probe``), timed
from A's answers to B's events (the measured quantities are described in bench_replicas.py)."""

from __future__ import annotations

import argparse
import collections
import json
import time
from typing import Any

import httpx
import trio

from scripts.load_inference import percentile_ms
from scripts.postgres_server import free_port

ROUTABLE_PORTS = 3  # fake-worker ports the routable samples rotate over
SAMPLE_TIMEOUT = 30.0  # seconds for one feed sample (POST, event, DELETE, removed)


class Watch:
    """``GET /workers/events`` on one replica, read in the background: when (time.perf_counter)
    each worker id was first named, first shown ``ready``, and ``removed``."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self._changed = trio.Event()

    async def run(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        """Started once the initial state has been sent (``synced``)."""
        timeout = httpx.Timeout(10, read=None)  # a quiet feed sends a heartbeat every 15 s
        async with (
            httpx.AsyncClient(base_url=url, trust_env=False, timeout=timeout) as client,
            client.stream("GET", "/workers/events") as response,
        ):
            if response.status_code != 200:
                raise RuntimeError(f"GET /workers/events on {url}: {response.status_code}")
            kind, started = "", False
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kind = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    now = time.perf_counter()
                    data = json.loads(line.removeprefix("data:"))
                    if kind == "synced" and not started:
                        started = True
                        task_status.started()
                    elif "id" in data:
                        self._note(kind, data, now)
                elif not line:
                    kind = ""
        raise RuntimeError(f"the watch on {url} ended")

    def _note(self, kind: str, worker: dict[str, Any], now: float) -> None:
        worker_id = worker["id"]
        self.seen.setdefault(("named", worker_id), now)
        if worker.get("status") == "ready":
            self.seen.setdefault(("ready", worker_id), now)
        if kind == "removed":
            self.seen.setdefault(("removed", worker_id), now)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, what: str, worker_id: str) -> float:
        """When the watch saw ``what`` (named, ready, removed) for ``worker_id``."""
        while (seen := self.seen.get((what, worker_id))) is None:
            await self._changed.wait()
        return seen


class Probe:
    """Changes made on replica A, timed until the watch on replica B shows them."""

    def __init__(self, a: httpx.AsyncClient, watch: Watch) -> None:
        self.a, self.watch = a, watch
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter[str] = collections.Counter()
        self.unexpected: collections.Counter[str] = collections.Counter()
        self.events_before_202 = 0
        self.current: str | None = None  # the worker the running sample left registered

    async def sample(self, address: str, until: str, name: str) -> None:
        """POST ``address`` on A, time its 202 → B's ``until`` event (samples[``name``]); then
        DELETE it on A, time its 202 → B's ``removed`` (samples[``name``_removed]). A sample
        that fails is counted, and its worker removed before the next."""
        self.current = None
        try:
            with trio.fail_after(SAMPLE_TIMEOUT):
                await self._timed(address, until, name)
        except (trio.TooSlowError, httpx.HTTPError) as error:
            slow = isinstance(error, trio.TooSlowError)
            self.errors["timeout" if slow else type(error).__name__] += 1
        if self.current is not None:
            await self.ensure_gone(self.current)

    async def _timed(self, address: str, until: str, name: str) -> None:
        sent = time.perf_counter()
        posted = await self.a.post("/workers", json={"url": address})
        answered = time.perf_counter()
        worker_id = _json(posted).get("worker_id")
        if isinstance(worker_id, str):
            self.current = worker_id  # a 409 names the worker already there: removed too
        if posted.status_code != 202 or not isinstance(worker_id, str):
            self.unexpected[f"POST {posted.status_code}"] += 1
            return
        seen = await self.watch.wait(until, worker_id)
        self.events_before_202 += seen < answered
        self.samples[name].append(seen - answered)
        self.samples[f"{name}_from_post"].append(seen - sent)
        deleted = await self.a.delete(f"/workers/{worker_id}")
        asked = time.perf_counter()
        if deleted.status_code != 202:
            self.unexpected[f"DELETE {deleted.status_code}"] += 1
            return
        removed = await self.watch.wait("removed", worker_id)
        self.samples[f"{name}_removed"].append(removed - asked)
        self.current = None

    async def ensure_gone(self, worker_id: str) -> None:
        """Best effort, answers not judged: DELETE on A, then wait until A answers 404."""
        with trio.move_on_after(SAMPLE_TIMEOUT) as scope:
            try:
                await self.a.delete(f"/workers/{worker_id}")
                while (await self.a.get(f"/workers/{worker_id}")).status_code != 404:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            except httpx.HTTPError:
                self.errors["cleanup_failed"] += 1
        if scope.cancelled_caught:
            self.errors["cleanup_failed"] += 1


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def latency(samples: list[float]) -> dict[str, Any]:
    return {
        "samples": len(samples),
        "p50": percentile_ms(samples, 50),
        "p99": percentile_ms(samples, 99),
        "max": percentile_ms(samples, 100),
    }


async def feed_latency(
    args: argparse.Namespace, urls: list[str], ports: list[int]
) -> dict[str, Any]:
    watch = Watch()
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there: the worker stays pending
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=urls[0], trust_env=False, timeout=SAMPLE_TIMEOUT) as a,
    ):
        with trio.fail_after(SAMPLE_TIMEOUT):
            await nursery.start(watch.run, urls[1])
        probe = Probe(a, watch)
        for _ in range(args.feed_samples):
            await probe.sample(closed, "named", "event")
        for n in range(args.routable_samples):
            await probe.sample(f"127.0.0.1:{ports[n % len(ports)]}", "ready", "routable")
        nursery.cancel_scope.cancel()
    return {
        "a_202_to_b_event_ms": latency(probe.samples["event"]),
        "a_post_to_b_event_ms": latency(probe.samples["event_from_post"]),
        "a_202_to_b_routable_ms": latency(probe.samples["routable"]),
        "a_delete_to_b_removed_ms": {
            "pending": latency(probe.samples["event_removed"]),
            "ready": latency(probe.samples["routable_removed"]),
        },
        "feed_events_before_202": probe.events_before_202,
        "feed_errors": dict(sorted(probe.errors.items())),
        "feed_unexpected": dict(sorted(probe.unexpected.items())),
    }


# ---- the run -------------------------------------------------------------------------------------
