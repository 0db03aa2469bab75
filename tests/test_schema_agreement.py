"""The API and its OpenAPI document agree on every body: bodies generated from the document's own
schema (as served at /openapi.json), valid ones and mutated ones, are sent to POST /workers and
PATCH /workers/{id} of a real gateway, and each is accepted exactly when it is valid under the
schema.

"Valid under the schema" is jsonschema's verdict plus what the schema says in words (its
descriptions), checked here explicitly:

* the url's syntax: generated urls are loopback addresses (``127.0.0.1:<port>``, with or without
  ``http://``), always valid; a mutation may remove the url or replace it by a value of any
  type, and a string that is not a generated url counts as invalid (no other address is sent);
* ``bootstrap_port`` only with ``worker_type`` prefill;
* lengths are UTF-8 bytes (``maxLength`` counts characters: the same number);
* an integer is written without a point or exponent (jsonschema also takes 5.0 as an integer);
* ``pattern`` anchors as ECMA-262 does: ``$`` is the end of the text (Python's ``re`` would also
  match before a final newline).

Nothing is probed: the gateway's detector is a stub that answers at once.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator, Iterator
from functools import partial
from types import SimpleNamespace
from typing import Any

import httpx
import hypothesis_jsonschema._from_schema as jsonschema_strategies
import jsonschema
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as conjecture_utils
from hypothesis_jsonschema import from_schema

from actors import open_gateway, worker_spec
from actors.registry.service import Gateway
from api.serve import serve_api
from scripts.fake_detector import InstantDetector
from tests.conftest import FAST

EXAMPLES = 150


class _LegacyMany:
    """hypothesis-jsonschema 0.23.1 draws object properties with ``many(...).more()``, which
    hypothesis 6.170 replaced by a context manager; this gives it the old interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._many = conjecture_utils.many(*args, **kwargs).__enter__()
        self._elements = iter(self._many)

    def more(self) -> bool:
        if next(self._elements, False) is None:
            return True
        self._many.__exit__(None)
        return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


jsonschema_strategies.cu = SimpleNamespace(  # type: ignore[attr-defined, assignment]
    **{**vars(conjecture_utils), "many": _LegacyMany}
)


def inline(schema: Any, components: dict[str, Any]) -> Any:
    """``schema`` with every ``$ref`` into the components replaced by its target."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = components[schema["$ref"].rsplit("/", 1)[-1]]
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            return {**inline(target, components), **inline(rest, components)}
        return {key: inline(value, components) for key, value in schema.items()}
    if isinstance(schema, list):
        return [inline(item, components) for item in schema]
    return schema


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if isinstance(instance, str) and not re.search(pattern.replace("$", r"\Z"), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    validators={"pattern": _ecma_pattern},
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


GENERATED_URL = re.compile(r"(http://)?127\.0\.0\.1:[1-9][0-9]*")  # what LOOPBACK_URLS makes


def _bytes_fit(value: Any, limit: int) -> bool:
    return not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) <= limit


def valid(body: Any, schema: dict[str, Any]) -> bool:
    """Valid under the schema: jsonschema's verdict and the rules the schema states in words."""
    if not Validator(schema).is_valid(body):
        return False
    properties = schema["properties"]
    url = body.get("url")
    if "url" in properties and isinstance(url, str) and not GENERATED_URL.fullmatch(url):
        return False  # the url's syntax, checked by code: only generated urls are good ones
    if body.get("bootstrap_port") is not None and body.get("worker_type") != "prefill":
        return False
    for name in {"model_id", "api_key"} & set(properties):
        limit = properties[name]["anyOf"][0]["maxLength"]
        if not _bytes_fit(body.get(name), limit):
            return False
    labels = properties["labels"]["anyOf"][0]
    key_limit = labels["propertyNames"]["maxLength"]
    value_schema = labels["additionalProperties"]
    value_limit = value_schema.get("maxLength") or value_schema["anyOf"][0]["maxLength"]
    for key, value in (body.get("labels") or {}).items():
        if not (_bytes_fit(key, key_limit) and _bytes_fit(value, value_limit)):
            return False
    return True


LOOPBACK_URLS = st.builds(
    "{}127.0.0.1:{}".format, st.sampled_from(["", "http://"]), st.integers(1, 65535)
)
WRONG_VALUES: st.SearchStrategy[Any] = st.sampled_from(
    [True, False, "5", "", 5, 5.0, -1, 0, 0.5, 1e-9, 1e10, 10**20, [], {}, {"bogus": 1}, None]
)


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]], schema: Any) -> Any:
    """A generated body, then (usually) one thing changed: a field's value, an unknown field, a
    field removed, a nested value changed."""
    body = copy.deepcopy(draw(bodies))
    names = sorted(schema["properties"])
    how = draw(st.sampled_from(["none", "value", "unknown", "remove", "health", "labels", "port"]))
    if how == "value":
        name = draw(st.sampled_from(names))
        body[name] = draw(WRONG_VALUES)
    elif how == "unknown":
        body[draw(st.sampled_from(["priorty", "x", "URL", "health_check"]))] = 1
    elif how == "remove" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif how == "health":
        health = body["health"] = dict(body.get("health") or {})
        health[draw(st.sampled_from(["timeout_secs", "failure_threshold", "disable", "bogus"]))] = (
            draw(WRONG_VALUES)
        )
    elif how == "labels":
        labels = body["labels"] = dict(body.get("labels") or {})
        labels[draw(st.sampled_from(["", "k", "k" * 257]))] = draw(
            st.sampled_from(["v", 1, None, "v" * 4097, "ü" * 2049])
        )
    elif how == "port" and "url" in schema["properties"]:
        body["bootstrap_port"] = draw(st.integers(0, 70000))
        body["worker_type"] = draw(st.sampled_from(["prefill", "decode", "regular", None]))
    return body


@pytest.fixture
async def stub_gateway() -> AsyncIterator[Gateway]:
    async with open_gateway(FAST, detector=InstantDetector()) as gateway:
        yield gateway


@pytest.fixture
async def api(stub_gateway: Gateway, nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    [url] = await nursery.start(partial(serve_api, stub_gateway, bind="127.0.0.1:0"))
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client:
        yield client


async def body_schemas(api: httpx.AsyncClient) -> dict[str, Any]:
    document = (await api.get("/openapi.json")).json()
    components = document["components"]["schemas"]
    operations = document["paths"]["/workers"]["post"], document["paths"]["/workers/{worker_id}"]
    post = operations[0]["requestBody"]["content"]["application/json"]["schema"]
    patch = operations[1]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    return {"post": inline(post, components), "patch": inline(patch, components)}


def generated(schema: dict[str, Any], *, with_url: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies valid under ``schema``; the url (which the schema cannot describe) is a loopback
    address."""
    if not with_url:
        bodies: st.SearchStrategy[Any] = from_schema(schema)  # an object schema: dicts
        return bodies
    without_url = copy.deepcopy(schema)
    del without_url["properties"]["url"]
    without_url["required"] = []
    return st.builds(
        lambda body, url: {**body, "url": url}, from_schema(without_url), LOOPBACK_URLS
    )


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


async def agree(
    api: httpx.AsyncClient, schema: dict[str, Any], strategy: Any, send: Any, accepted: set[int]
) -> dict[str, int]:
    """Run hypothesis in a thread; each example is sent from the trio loop. Returns counts."""
    seen = {"valid": 0, "invalid": 0}

    @SETTINGS
    @given(body=strategy)
    def check(body: Any) -> None:
        expected = valid(body, schema)
        status, text = trio.from_thread.run(send, body)
        assert (status in accepted) == expected, (status, text, json.dumps(body)[:2000])
        assert expected or status == 400, (status, text)  # a refusal is a 400, never a 500
        seen["valid" if expected else "invalid"] += 1

    await trio.to_thread.run_sync(check)
    return seen


async def test_post_workers_accepts_exactly_the_bodies_the_document_calls_valid(
    api: httpx.AsyncClient, stub_gateway: Gateway
) -> None:
    schema = (await body_schemas(api))["post"]

    async def send(body: Any) -> tuple[int, str]:
        answer = await api.post("/workers", json=body)
        if answer.status_code == 202:  # keep the registry small: the next body may reuse a port
            await api.delete(f"/workers/{answer.json()['worker_id']}")
        return answer.status_code, answer.text

    strategy = mutated(generated(schema, with_url=True), schema)
    with trio.fail_after(240):
        seen = await agree(api, schema, strategy, send, {202, 409})
    assert seen["valid"] >= EXAMPLES // 5 and seen["invalid"] >= EXAMPLES // 5, seen


async def test_patch_worker_accepts_exactly_the_bodies_the_document_calls_valid(
    api: httpx.AsyncClient, stub_gateway: Gateway
) -> None:
    schema = (await body_schemas(api))["patch"]
    worker = await stub_gateway.add_worker(worker_spec("127.0.0.1:1"))
    await stub_gateway.wait_status(worker.id, "ready", 5)

    async def send(body: Any) -> tuple[int, str]:
        answer = await api.patch(f"/workers/{worker.id}", json=body)
        return answer.status_code, answer.text

    strategy: st.SearchStrategy[Any] = (
        mutated(generated(schema, with_url=False), schema)
        | st.just({})
        | st.just({"url": "127.0.0.1:1"})
    )
    with trio.fail_after(240):
        seen = await agree(api, schema, strategy, send, {200})
    assert seen["valid"] >= EXAMPLES // 5 and seen["invalid"] >= EXAMPLES // 5, seen
