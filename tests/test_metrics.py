"""/metrics: Prometheus text that prometheus_client can parse, with the registry's state."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.core.snapshot import RegistrySnapshot
from actors.dataplane.metrics import GatewayMetrics
from actors.registry.service import Gateway
from tests.conftest import StartWorkers, register


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_parse_and_count_workers_by_status_and_registration_outcomes(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    with trio.fail_after(10):
        worker_id = (
            await client.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
        ).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        failing = {"url": "127.0.0.1:1", "max_connection_attempts": 1}
        failed_id = (await client.post("/workers", json=failing)).json()["worker_id"]
        await gateway.wait_status(failed_id, "failed", 5)
        gateway.inflight.acquire(worker_id)
        answer = await client.get("/metrics")
        gateway.inflight.release(worker_id)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found = samples(answer.text)
    assert found[("tmg_workers", (("status", "ready"),))] == 1
    assert found[("tmg_workers", (("status", "failed"),))] == 1
    assert found[("tmg_workers", (("status", "pending"),))] == 0
    assert found[("tmg_registration_jobs_total", (("outcome", "succeeded"),))] == 1
    assert found[("tmg_registration_jobs_total", (("outcome", "failed"),))] == 1
    assert found[("tmg_worker_in_flight", (("worker_id", worker_id),))] == 1
    assert found[("tmg_registry_inbox_depth", ())] == 0


async def test_a_removed_worker_leaves_no_series_behind(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    workers = await start_workers(2, model="m")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with trio.fail_after(20):
        [kept, removed] = await register(gateway, [w.port for w in workers])
        for _ in range(6):
            assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        before = (await client.get("/metrics")).text
        await gateway.remove_worker(removed)
        await gateway.wait_removed(removed, 5)
        after = (await client.get("/metrics")).text

    def series_of(text: str, worker_id: str) -> set[str]:
        return {
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("worker_id") == worker_id
        }

    assert "tmg_requests_total" in series_of(before, removed)
    assert series_of(after, removed) == set()
    kept_series = ("tmg_requests_total", (("code", "200"), ("model", "m"), ("worker_id", kept)))
    assert samples(after)[kept_series] == 3


def test_an_answer_from_a_worker_removed_meanwhile_creates_no_series() -> None:
    metrics = GatewayMetrics()
    metrics.watch(RegistrySnapshot, dict, dict, lambda: 0)  # a registry without workers
    metrics.count_request("m", "gone", 200)
    assert b'worker_id="gone"' not in metrics.render()


def test_busy_answers_are_counted_per_worker_and_their_series_go_with_the_worker() -> None:
    metrics = GatewayMetrics()
    metrics.count_busy("w1")
    metrics.count_busy("w1")
    metrics.count_busy("w2")
    found = samples(metrics.render().decode())
    assert found[("tmg_worker_busy_total", (("worker_id", "w1"),))] == 2
    assert found[("tmg_worker_busy_total", (("worker_id", "w2"),))] == 1

    metrics.forget_worker("w1")
    metrics.watch(RegistrySnapshot, dict, dict, lambda: 0)  # w1 is no longer registered
    metrics.count_busy("w1")  # an answer from before the removal, arriving late

    rendered = metrics.render()
    assert b'worker_id="w1"' not in rendered
    assert b'tmg_worker_busy_total{worker_id="w2"} 1.0' in rendered
