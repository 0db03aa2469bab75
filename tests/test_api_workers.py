"""The worker lifecycle over real HTTP, against real fake-worker servers on real sockets."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from functools import partial

import httpx
import pytest
import trio

from actors import GatewayConfig, open_gateway
from actors.registry.service import Gateway
from api.serve import serve_api
from tests.conftest import FAST, StartWorkers, wait_until

JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    """A port where nothing listens (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def silent_port(nursery: trio.Nursery) -> int:
    """A port that accepts connections and never answers a byte."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hold() -> None:
        held: list[trio.SocketStream] = []
        try:
            while True:
                held.append(await listener.accept())
        finally:
            for stream in held:
                stream.socket.close()
            listener.socket.close()

    nursery.start_soon(hold)
    port: int = listener.socket.getsockname()[1]
    return port


async def post(client: httpx.AsyncClient, body: Mapping[str, object]) -> httpx.Response:
    return await client.post("/workers", json=body)


async def test_a_bare_address_becomes_ready_at_the_id_its_202_returned(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="llama-3")
    with trio.fail_after(10):
        answer = await post(client, {"url": f"127.0.0.1:{worker.port}"})
        assert answer.status_code == 202
        worker_id = answer.json()["worker_id"]
        assert answer.headers["Location"] == f"/workers/{worker_id}"
        assert (await client.get(f"/workers/{worker_id}")).status_code == 200
        await gateway.wait_status(worker_id, "ready", 10)
        info = (await client.get(f"/workers/{worker_id}")).json()
        listing = (await client.get("/workers")).json()
    assert info["status"] == "ready"
    assert info["url"] == f"http://127.0.0.1:{worker.port}"  # detection chose the scheme
    assert info["connection_mode"] == "http"
    assert info["runtime_type"] == "sglang"
    assert [m["id"] for m in info["models"]] == ["llama-3"]
    assert info["job_status"]["status"] == "succeeded"
    assert "api_key" not in info
    assert [w["id"] for w in listing["workers"]] == [worker_id]


async def test_a_registration_with_nothing_listening_is_failed_with_a_reason_and_nothing_else(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    port = free_port()
    with trio.fail_after(10):
        answer = await post(
            client, {"url": f"http://127.0.0.1:{port}", "max_connection_attempts": 2}
        )
        worker_id = answer.json()["worker_id"]
        await gateway.wait_status(worker_id, "failed", 10)
        info = (await client.get(f"/workers/{worker_id}")).json()
        listing = (await client.get("/workers")).json()
        again = await post(client, {"url": f"127.0.0.1:{port}"})
    assert info["status"] == "failed"
    assert info["job_status"]["status"] == "failed"
    assert info["job_status"]["attempts"] == 2
    assert "connection refused" in info["job_status"]["message"]
    assert listing["total"] == 1
    assert listing["stats"]["by_status"]["failed"] == 1
    assert again.status_code == 409
    assert again.json()["worker_id"] == worker_id


async def test_a_detection_timeout_is_failed_saying_it_timed_out(
    client: httpx.AsyncClient, gateway: Gateway, silent_port: int
) -> None:
    body = {"url": f"127.0.0.1:{silent_port}", "registration_timeout_secs": 0.3}
    with trio.fail_after(10):
        worker_id = (await post(client, body)).json()["worker_id"]
        await gateway.wait_status(worker_id, "failed", 10)
        info = (await client.get(f"/workers/{worker_id}")).json()
    assert info["job_status"]["message"].startswith("timed out after 0.3 s")
    assert (await client.get("/workers")).json()["total"] == 1


async def test_a_job_that_cannot_be_queued_is_a_503_and_leaves_nothing(
    nursery: trio.Nursery, silent_port: int
) -> None:
    config = GatewayConfig(registration_concurrency=1, registration_queue_size=1)
    async with open_gateway(config) as gateway:
        [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0"))
        async with httpx.AsyncClient(base_url=url) as client:
            with trio.fail_after(10):
                busy = {"url": f"127.0.0.1:{silent_port}", "registration_timeout_secs": 30}
                first = await post(client, busy)
                await trio.testing.wait_all_tasks_blocked()  # the one task is now detecting
                second = await post(client, {"url": f"127.0.0.1:{free_port()}"})
                third = await post(client, {"url": "127.0.0.1:9"})
                listing = (await client.get("/workers")).json()
    assert (first.status_code, second.status_code) == (202, 202)
    assert third.status_code == 503
    assert third.json()["code"] == "REGISTRY_BUSY"
    assert sorted(w["id"] for w in listing["workers"]) == sorted(
        [first.json()["worker_id"], second.json()["worker_id"]]
    )
    assert all(w["url"] != "127.0.0.1:9" for w in listing["workers"])


async def test_delete_of_a_pending_worker_cancels_its_registration_at_once(
    nursery: trio.Nursery, silent_port: int, start_workers: StartWorkers
) -> None:
    [good] = await start_workers(1)
    async with open_gateway(GatewayConfig(registration_concurrency=1)) as gateway:
        [url] = await nursery.start(partial(serve_api, gateway, bind="127.0.0.1:0"))
        async with httpx.AsyncClient(base_url=url) as client:
            with trio.fail_after(10):
                stuck = await post(client, {"url": f"127.0.0.1:{silent_port}"})
                stuck_id = stuck.json()["worker_id"]
                await trio.testing.wait_all_tasks_blocked()
                deleted = await client.delete(f"/workers/{stuck_id}")
                after = await client.get(f"/workers/{stuck_id}")
                # the only registration task is free again: the next worker registers at once
                fresh = (await post(client, {"url": f"127.0.0.1:{good.port}"})).json()
                await gateway.wait_status(fresh["worker_id"], "ready", 5)
    assert deleted.status_code == 202
    assert deleted.json()["worker_status"] == "removed"
    assert after.status_code == 404


async def test_delete_of_an_idle_ready_worker_removes_it_before_the_202(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": f"127.0.0.1:{worker.port}"})).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        deleted = await client.delete(f"/workers/{worker_id}")
        gone = await client.get(f"/workers/{worker_id}")
        again = await client.delete(f"/workers/{worker_id}")
    assert deleted.status_code == 202
    assert deleted.json()["worker_status"] == "removed"
    assert gone.status_code == 404
    assert again.status_code == 404


async def test_put_swaps_the_new_spec_in_place_under_the_same_id(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, model="m1")
    address = f"127.0.0.1:{worker.port}"
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": address, "priority": 10})).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        put = await client.put(
            f"/workers/{worker_id}",
            json={"url": f"http://{address}/", "priority": 70, "labels": {"zone": "b"}},
        )
        while (info := (await client.get(f"/workers/{worker_id}")).json())["job_status"][
            "status"
        ] != "succeeded":
            assert info["status"] == "ready" and info["priority"] in (10, 70)
            await gateway.wait_changed()
    assert put.status_code == 202
    assert put.json()["worker_id"] == worker_id
    assert info["priority"] == 70
    assert info["labels"]["zone"] == "b"
    assert info["spec_version"] == 2
    assert info["job_status"]["job_type"] == "ReplaceWorker"
    assert gateway.snapshot.by_model["m1"] == (worker_id,)


async def test_a_put_whose_detection_fails_keeps_the_old_spec_serving(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    address = f"127.0.0.1:{worker.port}"
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": address, "priority": 10})).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        worker.config.fail_health = True
        body = {"url": address, "priority": 90, "max_connection_attempts": 1}
        assert (await client.put(f"/workers/{worker_id}", json=body)).status_code == 202
        while gateway.get_worker(worker_id).job.state.value != "failed":  # type: ignore[union-attr]
            await gateway.wait_changed()
        info = (await client.get(f"/workers/{worker_id}")).json()
    assert info["status"] == "ready"
    assert info["priority"] == 10
    assert info["spec_version"] == 1
    assert "503" in info["job_status"]["message"]


async def test_a_patch_during_a_put_cancels_the_put_which_never_undoes_it(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    address = f"127.0.0.1:{worker.port}"
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": address})).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        worker.config.fail_health = True  # the PUT's detection keeps retrying
        await client.put(f"/workers/{worker_id}", json={"url": address, "priority": 99})
        patched = await client.patch(f"/workers/{worker_id}", json={"priority": 5})
        worker.config.fail_health = False
        info = (await client.get(f"/workers/{worker_id}")).json()
    assert patched.status_code == 200
    assert patched.json()["priority"] == 5
    assert info["priority"] == 5
    assert info["job_status"]["status"] == "cancelled"
    assert "PATCH" in info["job_status"]["message"]


async def test_patch_is_applied_before_its_200_and_merges_labels(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    with trio.fail_after(10):
        body = {"url": f"127.0.0.1:{worker.port}", "labels": {"zone": "a", "rack": "1"}}
        worker_id = (await post(client, body)).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        patch = {"cost": 2.5, "labels": {"rack": None, "gpu": "h100"}}
        patched = await client.patch(f"/workers/{worker_id}", json=patch)
        read = await client.get(f"/workers/{worker_id}")
    assert patched.status_code == 200
    assert read.json()["cost"] == 2.5
    assert read.json()["labels"]["zone"] == "a"
    assert read.json()["labels"]["gpu"] == "h100"
    assert "rack" not in read.json()["labels"]
    assert read.headers["ETag"] == '"2"'


async def test_if_match_refuses_a_write_based_on_an_old_version(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": f"127.0.0.1:{worker.port}"})).json()["worker_id"]
        etag = (await client.get(f"/workers/{worker_id}")).headers["ETag"]
        first = await client.patch(
            f"/workers/{worker_id}", json={"priority": 1}, headers={"If-Match": etag}
        )
        second = await client.patch(
            f"/workers/{worker_id}", json={"priority": 2}, headers={"If-Match": etag}
        )
    assert first.status_code == 200
    assert second.status_code == 412
    assert second.json()["code"] == "PRECONDITION_FAILED"
    assert gateway.get_worker(worker_id).spec.priority == 1


async def test_a_failed_worker_is_retried_on_request_and_rechecked_by_itself(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [one, two] = await start_workers(2, fail_health=True)
    with trio.fail_after(10):
        retried = (
            await post(client, {"url": f"127.0.0.1:{one.port}", "max_connection_attempts": 1})
        ).json()["worker_id"]
        body = {
            "url": f"127.0.0.1:{two.port}",
            "max_connection_attempts": 1,
            "recheck_interval_secs": 1.0,  # the minimum
        }
        rechecked = (await post(client, body)).json()["worker_id"]
        for worker_id in (retried, rechecked):
            await gateway.wait_status(worker_id, "failed", 5)
        assert (await client.post(f"/workers/{retried}/retry")).status_code == 202
        await gateway.wait_status(retried, "failed", 5)  # still refusing: failed again
        one.config.fail_health = two.config.fail_health = False
        assert (await client.post(f"/workers/{retried}/retry")).status_code == 202
        await gateway.wait_status(retried, "ready", 5)
        await wait_until(gateway, lambda: gateway.get_worker(rechecked).status.value == "ready")
        conflict = await client.post(f"/workers/{retried}/retry")
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "WORKER_NOT_FAILED"


async def test_a_vllm_worker_is_detected_as_vllm(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1, flavor="vllm", model="qwen")
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": f"http://127.0.0.1:{worker.port}"})).json()[
            "worker_id"
        ]
        await gateway.wait_status(worker_id, "ready", 5)
        info = (await client.get(f"/workers/{worker_id}")).json()
    assert info["runtime_type"] == "vllm"
    assert info["models"][0]["id"] == "qwen"


@pytest.mark.parametrize("spelling", ["127.0.0.1:{port}", "grpc://127.0.0.1:{port}"])
async def test_a_grpc_worker_is_registered_with_connection_mode_grpc(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers, spelling: str
) -> None:
    [worker] = await start_workers(1, flavor="grpc")
    url = spelling.format(port=worker.port)
    with trio.fail_after(10):
        worker_id = (await post(client, {"url": url, "model_id": "m"})).json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        info = (await client.get(f"/workers/{worker_id}")).json()
    assert info["connection_mode"] == "grpc"
    assert info["url"] == f"grpc://127.0.0.1:{worker.port}"
    assert info["model_id"] == "m"


async def test_readiness_follows_ready_workers_and_filters_select_them(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [a, b] = await start_workers(2, model="m")
    with trio.fail_after(10):
        assert (await client.get("/readiness")).status_code == 503
        ids = []
        for worker, kind in ((a, "regular"), (b, "decode")):
            body = {"url": f"127.0.0.1:{worker.port}", "worker_type": kind}
            ids.append((await post(client, body)).json()["worker_id"])
        for worker_id in ids:
            await gateway.wait_status(worker_id, "ready", 5)
        ready = await client.get("/readiness")
        decode = (await client.get("/workers", params={"worker_type": "decode"})).json()
        by_model = (await client.get("/workers", params={"model": "m", "status": "ready"})).json()
        none = (await client.get("/workers", params={"model": "other"})).json()
    assert ready.status_code == 200
    assert [w["id"] for w in decode["workers"]] == [ids[1]]
    assert decode["stats"]["decode_count"] == 1
    assert by_model["total"] == 2
    assert none["total"] == 0


async def test_health_and_liveness_answer_ok(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/liveness"):
        answer = await client.get(path)
        assert (answer.status_code, answer.text) == (200, "OK")


async def test_the_fast_test_config_is_what_the_gateway_runs(gateway: Gateway) -> None:
    assert gateway.config == FAST
