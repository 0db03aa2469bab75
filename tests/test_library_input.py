"""A library caller's values are checked where they are built, with the HTTP API's rules and
messages: a bad one raises InvalidInput (a ValueError) naming the field, and the gateway it was
meant for keeps running. Nothing unchecked reaches an actor. The network is mocked throughout."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from actors import (
    GatewayConfig,
    HealthConfig,
    InvalidInput,
    Runtime,
    WorkerPatch,
    WorkerSpec,
    WorkerType,
    WorkerUrl,
    open_gateway,
    parse_worker_url,
    worker_spec,
)
from actors.core import validation as check
from actors.registry.service import Gateway
from api.schemas import parse_worker_patch, parse_worker_spec
from tests.conftest import FAST

URL = "127.0.0.1:8000"
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "sglang"}]}


def sglang(request: httpx.Request) -> httpx.Response:
    routes = {"/health": (200, None), "/v1/models": (200, MODELS)}
    status, body = routes.get(request.url.path, (404, {"error": "no"}))
    return httpx.Response(status, json=body)


@asynccontextmanager
async def mocked_gateway() -> AsyncIterator[Gateway]:
    async with open_gateway(FAST, http_transport=httpx.MockTransport(sglang)) as gateway:
        yield gateway


async def still_serves(gateway: Gateway, url: str = "127.0.0.1:8999") -> None:
    """The gateway still takes a valid worker and registers it."""
    worker = await gateway.add_worker(worker_spec(url))
    await gateway.wait_status(worker.id, "ready", 5)


SPEC_CASES: list[tuple[Callable[[], WorkerSpec], str]] = [
    (lambda: worker_spec(URL, registration_timeout_secs=-1), "registration_timeout_secs"),
    (lambda: worker_spec(URL, registration_timeout_secs=1e-9), "registration_timeout_secs"),
    (lambda: worker_spec(URL, recheck_interval_secs=1e-9), "recheck_interval_secs"),
    (lambda: worker_spec(URL, recheck_interval_secs=0.5), "recheck_interval_secs"),
    (lambda: worker_spec(URL, drain_timeout_secs=-1.0), "drain_timeout_secs"),
    (lambda: worker_spec(URL, drain_timeout_secs=math.inf), "drain_timeout_secs"),
    (lambda: worker_spec(URL, max_connection_attempts=0), "max_connection_attempts"),
    (lambda: worker_spec(URL, max_connection_attempts=10**6), "max_connection_attempts"),
    (lambda: worker_spec(URL, labels={"a": 1}), "labels.a"),
    (lambda: worker_spec(URL, labels={1: "a"}), "labels"),
    (lambda: worker_spec(URL, labels=["a"]), "labels"),
    (lambda: worker_spec(URL, priority="5"), "priority"),
    (lambda: worker_spec(URL, priority=True), "priority"),
    (lambda: worker_spec(URL, priority=5.0), "priority"),
    (lambda: worker_spec(URL, priority=101), "priority"),
    (lambda: worker_spec(URL, cost=0), "cost"),
    (lambda: worker_spec(URL, cost=math.nan), "cost"),
    (lambda: worker_spec(URL, cost=10**400), "cost"),
    (lambda: worker_spec(URL, cost="1"), "cost"),
    (lambda: worker_spec(URL, worker_type="gpu"), "worker_type"),
    (lambda: worker_spec(URL, runtime="tgi"), "runtime"),
    (lambda: worker_spec(URL, bootstrap_port=9000), "bootstrap_port"),
    (lambda: worker_spec(URL, worker_type="prefill", bootstrap_port=70000), "bootstrap_port"),
    (lambda: worker_spec(URL, model_id=""), "model_id"),
    (lambda: worker_spec(URL, model_id=7), "model_id"),
    (lambda: worker_spec(URL, api_key="ключ"), "api_key"),
    (lambda: worker_spec(URL, api_key="sk two"), "api_key"),
    (lambda: worker_spec(URL, api_key="sk\r\nX-Evil: 1"), "api_key"),
    (lambda: worker_spec(URL, health={"timeout_secs": 0}), "health.timeout_secs"),
    (lambda: worker_spec(URL, health={"bogus": 1}), "health.bogus"),
    (lambda: worker_spec(URL, health=3), "health"),
    (
        lambda: worker_spec(URL, health=HealthConfig(check_interval_secs=1e-9)),
        "health.check_interval_secs",
    ),
    (
        lambda: worker_spec(URL, health=HealthConfig(failure_threshold=0)),
        "health.failure_threshold",
    ),
    (lambda: worker_spec(URL, health=HealthConfig(disable=1)), "health.disable"),  # type: ignore[arg-type]
    (
        lambda: worker_spec(URL, health=HealthConfig(drain_settle_secs=-1)),
        "health.drain_settle_secs",
    ),
    (lambda: worker_spec(URL, priorty=5), "priorty"),
    (lambda: worker_spec(12345), "url"),  # type: ignore[arg-type]
    (lambda: WorkerSpec(url=12345), "url"),  # type: ignore[arg-type]
    (lambda: WorkerSpec(url="ftp://127.0.0.1:1"), "url"),  # type: ignore[arg-type]
    (lambda: WorkerSpec(url="127.0.0.1"), "url"),  # type: ignore[arg-type]
    (lambda: WorkerSpec(url=WorkerUrl("http", "a b", 1)), "url"),
    (lambda: WorkerSpec(url=WorkerUrl("http", "a", 70000)), "url"),
    (lambda: WorkerSpec(url=WorkerUrl("http", None, 1)), "url"),  # type: ignore[arg-type]
    (lambda: WorkerSpec(url=WorkerUrl("http", "a", "80x")), "url"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("build", "field"), SPEC_CASES)
async def test_a_bad_spec_value_is_invalid_input_naming_the_field_and_the_gateway_keeps_running(
    build: Callable[[], WorkerSpec], field: str
) -> None:
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            with pytest.raises(InvalidInput) as caught:
                await gateway.add_worker(build())
            assert caught.value.field == field
            assert str(caught.value).startswith(f"{field}: ")
            assert isinstance(caught.value, ValueError)
            assert gateway.list_workers() == []
            await still_serves(gateway)


PATCH_CASES: list[tuple[Callable[[], WorkerPatch], str]] = [
    (lambda: WorkerPatch(health={"bogus": 1}), "health.bogus"),
    (lambda: WorkerPatch(health={"check_interval_secs": 1e-9}), "health.check_interval_secs"),
    (lambda: WorkerPatch(health={"timeout_secs": "1"}), "health.timeout_secs"),
    (lambda: WorkerPatch(health=HealthConfig()), "health"),  # type: ignore[arg-type]
    (lambda: WorkerPatch(labels={"a": 1}), "labels.a"),  # type: ignore[dict-item]
    (lambda: WorkerPatch(priority=101), "priority"),
    (lambda: WorkerPatch(priority=True), "priority"),
    (lambda: WorkerPatch(cost=-1.0), "cost"),
    (lambda: WorkerPatch(api_key="a b"), "api_key"),
]


@pytest.mark.parametrize(("build", "field"), PATCH_CASES)
async def test_a_bad_patch_value_is_invalid_input_naming_the_field_and_the_worker_is_unchanged(
    build: Callable[[], WorkerPatch], field: str
) -> None:
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            worker = await gateway.add_worker(worker_spec(URL))
            await gateway.wait_status(worker.id, "ready", 5)
            with pytest.raises(InvalidInput) as caught:
                await gateway.update_worker(worker.id, build())
            assert caught.value.field == field
            assert gateway.get_worker(worker.id).spec_version == 1
            patched = await gateway.update_worker(worker.id, WorkerPatch(priority=7))
            assert patched.spec.priority == 7
            await still_serves(gateway)


async def test_a_spec_built_with_a_url_string_is_registered_under_the_parsed_url() -> None:
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            spec = WorkerSpec(url="HTTP://127.0.0.1:8000/")  # type: ignore[arg-type]
            worker = await gateway.add_worker(spec)
            ready = await gateway.wait_status(worker.id, "ready", 5)
    assert spec.url == parse_worker_url("http://127.0.0.1:8000")
    assert ready.url.text == "http://127.0.0.1:8000"


def test_enum_fields_take_their_string_values_and_numbers_are_kept_as_floats() -> None:
    spec = worker_spec(URL, worker_type="prefill", runtime="vllm", bootstrap_port=9000, cost=2)
    health = HealthConfig(timeout_secs=1, check_interval_secs=5)

    assert spec.worker_type is WorkerType.PREFILL
    assert spec.runtime is Runtime.VLLM
    assert isinstance(spec.cost, float)
    assert isinstance(health.timeout_secs, float)
    assert spec == parse_worker_spec(
        {
            "url": URL,
            "worker_type": "prefill",
            "runtime": "vllm",
            "bootstrap_port": 9000,
            "cost": 2,
        }
    )


def test_a_hand_built_worker_url_is_kept_in_its_canonical_form() -> None:
    spec = WorkerSpec(url=WorkerUrl("HTTP", "LOCALHOST", 80))

    assert spec.url == parse_worker_url("http://localhost:80")


def test_a_spec_keeps_its_own_copy_of_the_labels_it_was_given() -> None:
    labels = {"zone": "a"}
    spec = worker_spec(URL, labels=labels)
    labels["zone"] = "b"

    assert spec.labels == {"zone": "a"}


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        ({"health": {"check_interval_secs": 1e-9}}, {"health": {"check_interval_secs": 1e-9}}),
        ({"recheck_interval_secs": 0.5}, {"recheck_interval_secs": 0.5}),
        ({"labels": {"k": 1}}, {"labels": {"k": 1}}),
        ({"priority": True}, {"priority": True}),
        ({"api_key": "two words"}, {"api_key": "two words"}),
        ({"cost": 10**400}, {"cost": 10**400}),
    ],
)
def test_the_library_and_the_api_refuse_a_value_with_the_same_message(
    fields: dict[str, Any], body: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput) as library:
        worker_spec(URL, **fields)
    with pytest.raises(InvalidInput) as api:
        parse_worker_spec({"url": URL, **body})

    assert str(library.value) == str(api.value)
    assert library.value.field == api.value.field


def test_a_patch_body_and_a_library_patch_refuse_a_health_value_with_the_same_message() -> None:
    with pytest.raises(InvalidInput) as library:
        WorkerPatch(health={"check_interval_secs": 0.01})
    with pytest.raises(InvalidInput) as api:
        parse_worker_patch({"health": {"check_interval_secs": 0.01}})

    assert str(library.value) == str(api.value)
    assert "health.check_interval_secs" in str(api.value)


def test_an_api_key_is_never_quoted_in_its_refusal() -> None:
    with pytest.raises(InvalidInput) as caught:
        worker_spec(URL, api_key="sk-secret ключ")

    assert "sk-secret" not in str(caught.value)
    assert "sk-secret" not in repr(caught.value.context)


def test_a_huge_integer_is_described_not_printed() -> None:
    with pytest.raises(InvalidInput) as caught:
        worker_spec(URL, priority=10**5000)

    assert "very large" in str(caught.value)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"registration_concurrency": 0}, "registration_concurrency"),
        ({"registration_concurrency": "8"}, "registration_concurrency"),
        ({"registration_queue_size": 1.5}, "registration_queue_size"),
        ({"inbox_size": True}, "inbox_size"),
        ({"max_connection_attempts": 0}, "max_connection_attempts"),
        ({"max_connection_attempts": None}, "max_connection_attempts"),
        ({"registration_timeout_secs": -1}, "registration_timeout_secs"),
        ({"registration_timeout_secs": 1e-9}, "registration_timeout_secs"),
        ({"recheck_interval_secs": 1e-9}, "recheck_interval_secs"),
        ({"drain_timeout_secs": math.nan}, "drain_timeout_secs"),
        ({"backoff_initial_secs": 0}, "backoff_initial_secs"),
        ({"backoff_initial_secs": 1.0, "backoff_max_secs": 0.5}, "backoff_max_secs"),
        ({"ask_timeout_secs": 0}, "ask_timeout_secs"),
        ({"policy": "fastest"}, "policy"),
        ({"retries": -1}, "retries"),
        ({"retries": True}, "retries"),
        ({"breaker_failures": 0}, "breaker_failures"),
        ({"breaker_cooldown_secs": 1e-9}, "breaker_cooldown_secs"),
        ({"upstream_connect_timeout_secs": 0}, "upstream_connect_timeout_secs"),
        ({"upstream_read_timeout_secs": math.inf}, "upstream_read_timeout_secs"),
        ({"allowed_networks": "169.254.10.0/24"}, "allowed_networks"),
        ({"allowed_networks": ("not a network",)}, "allowed_networks"),
        ({"allowed_networks": (1,)}, "allowed_networks"),
        ({"instance_id": ""}, "instance_id"),
        ({"instance_id": "a\r\nx-evil: 1"}, "instance_id"),
        ({"instance_id": "a,b"}, "instance_id"),
    ],
)
def test_a_bad_gateway_config_value_is_invalid_input_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        GatewayConfig(**fields)

    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)  # the CLI's ``except ValueError`` reports it


def test_a_gateway_config_takes_lists_for_tuples_and_integers_for_seconds() -> None:
    config = GatewayConfig(allowed_networks=["169.254.10.0/24"], drain_timeout_secs=5)  # type: ignore[arg-type]

    assert config.allowed_networks == ("169.254.10.0/24",)
    assert config.drain_timeout_secs == 5.0
    assert isinstance(config.drain_timeout_secs, float)


def test_the_backoff_after_any_number_of_attempts_is_at_most_its_maximum() -> None:
    config = GatewayConfig(backoff_initial_secs=0.1, backoff_max_secs=5.0)

    assert config.backoff(1) == 0.1
    assert config.backoff(3) == 0.4
    assert config.backoff(check.MAX_ATTEMPTS) == 5.0  # 2 ** 9999 would not fit in a float


async def test_the_largest_accepted_values_register_and_leave_the_gateway_running() -> None:
    health = HealthConfig(
        timeout_secs=check.MAX_SECONDS,
        check_interval_secs=check.MAX_SECONDS,
        failure_threshold=check.MAX_THRESHOLD,
        success_threshold=check.MAX_THRESHOLD,
        drain_settle_secs=check.MAX_SECONDS,
    )
    spec = worker_spec(
        URL,
        priority=100,
        cost=check.MAX_SECONDS,
        max_connection_attempts=check.MAX_ATTEMPTS,
        registration_timeout_secs=check.MAX_SECONDS,
        recheck_interval_secs=check.MAX_SECONDS,
        drain_timeout_secs=check.MAX_SECONDS,
        health=health,
        labels={str(i): "v" * check.MAX_LABEL_VALUE_BYTES for i in range(check.MAX_LABELS)},
    )
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            worker = await gateway.add_worker(spec)
            await gateway.wait_status(worker.id, "ready", 5)
            await gateway.update_worker(worker.id, WorkerPatch(priority=0, cost=1e-9))
            await gateway.remove_worker(worker.id)  # drains: held by the huge settle delay
            await still_serves(gateway)


async def test_a_value_that_is_not_a_spec_is_refused_before_it_reaches_the_registry() -> None:
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            worker = await gateway.add_worker(worker_spec(URL))
            with pytest.raises(InvalidInput) as added:
                await gateway.add_worker({"url": URL})  # type: ignore[arg-type]
            with pytest.raises(InvalidInput) as replaced:
                await gateway.replace_worker(worker.id, URL)  # type: ignore[arg-type]
            assert added.value.field == replaced.value.field == "spec"
            await still_serves(gateway)


# These rely on the guards in Gateway's write methods (actors/registry/service.py): without
# them the registry would receive the value and crash.
async def test_a_patch_that_is_not_a_worker_patch_is_refused_and_the_gateway_keeps_running() -> (
    None
):
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            worker = await gateway.add_worker(worker_spec(URL))
            with pytest.raises(InvalidInput):
                await gateway.update_worker(worker.id, {"priority": 1})  # type: ignore[arg-type]
            await still_serves(gateway)


async def test_a_worker_id_that_is_not_a_string_is_refused_and_the_gateway_keeps_running() -> None:
    async with mocked_gateway() as gateway:
        with trio.fail_after(10):
            with pytest.raises(InvalidInput):
                await gateway.remove_worker(["not", "an", "id"])  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await gateway.retry_worker({"id": 1})  # type: ignore[arg-type]
            await still_serves(gateway)
