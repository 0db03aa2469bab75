"""Bad input gets its documented status and names the problem; none is a 500; none changes the
registry. Also the admin key and the OpenAPI description."""

from __future__ import annotations

import contextlib
import json
from functools import partial
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from openapi_spec_validator import validate

from actors.core.errors import InvalidInput
from actors.core.model import HEALTH_FIELDS
from actors.registry.service import Gateway
from api.openapi_schemas import SCHEMAS
from api.schemas import MAX_JSON_DEPTH, PATCH_FIELDS, SPEC_FIELDS, json_depth, load_json_object
from api.serve import serve_api
from tests.conftest import StartWorkers

ID = "6f1c2b43-9a55-4a1e-8a0e-3f0b8d9c1e21"
J = {"Content-Type": "application/json"}
CASES: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    # method, path, body (str: raw), headers, status, text the error must contain
    ("POST", "/workers", '{"url":', J, 400, "not valid JSON"),
    ("POST", "/workers", "[1, 2]", J, 400, "JSON object"),
    ("POST", "/workers", {}, J, 400, "url"),
    ("POST", "/workers", {"url": 12345}, J, 400, "url"),
    ("POST", "/workers", {"url": "a:1", "priorty": 1}, J, 400, "priorty"),
    ("POST", "/workers", {"url": "a:1", "health": {"bogus": 1}}, J, 400, "health.bogus"),
    (
        "POST",
        "/workers",
        {"url": "a:1", "health": {"timeout_secs": "x"}},
        J,
        400,
        "health.timeout_secs",
    ),
    ("POST", "/workers", {"url": "a:1", "health": 3}, J, 400, "health"),
    ("POST", "/workers", {"url": "a:1", "priority": "high"}, J, 400, "priority"),
    ("POST", "/workers", {"url": "a:1", "priority": 101}, J, 400, "priority"),
    ("POST", "/workers", {"url": "a:1", "priority": True}, J, 400, "priority"),
    ("POST", "/workers", {"url": "a:1", "cost": 0}, J, 400, "cost"),
    ("POST", "/workers", '{"url": "a:1", "cost": NaN}', J, 400, "NaN"),
    ("POST", "/workers", {"url": "a:1", "labels": []}, J, 400, "labels"),
    ("POST", "/workers", {"url": "a:1", "labels": {"k": 1}}, J, 400, "labels.k"),
    (
        "POST",
        "/workers",
        {"url": "a:1", "labels": {str(i): "v" for i in range(129)}},
        J,
        400,
        "129 labels",
    ),
    ("POST", "/workers", {"url": "a:1", "labels": {"k" * 257: "v"}}, J, 400, "labels"),
    ("POST", "/workers", {"url": "a:1", "labels": {"k": "v" * 4097}}, J, 400, "labels.k"),
    ("POST", "/workers", {"url": "a:1", "worker_type": "gpu"}, J, 400, "worker_type"),
    ("POST", "/workers", {"url": "a:1", "runtime": "tgi"}, J, 400, "runtime"),
    ("POST", "/workers", {"url": "a:1", "bootstrap_port": 9000}, J, 400, "bootstrap_port"),
    (
        "POST",
        "/workers",
        {"url": "a:1", "max_connection_attempts": 0},
        J,
        400,
        "max_connection_attempts",
    ),
    (
        "POST",
        "/workers",
        {"url": "a:1", "registration_timeout_secs": 0},
        J,
        400,
        "registration_timeout_secs",
    ),
    ("POST", "/workers", {"url": "a:1", "drain_timeout_secs": -1}, J, 400, "drain_timeout_secs"),
    ("POST", "/workers", {"url": ""}, J, 400, "empty"),
    ("POST", "/workers", {"url": "ftp://a:1"}, J, 400, "scheme"),
    ("POST", "/workers", {"url": "http://a:1/v1"}, J, 400, "path"),
    ("POST", "/workers", {"url": "http://a:1?x=1"}, J, 400, "query"),
    ("POST", "/workers", {"url": "http://a:1#f"}, J, 400, "fragment"),
    ("POST", "/workers", {"url": "http://u:p@a:1"}, J, 400, "userinfo"),
    ("POST", "/workers", {"url": "http://a:70000"}, J, 400, "port"),
    ("POST", "/workers", {"url": "a"}, J, 400, "port"),
    ("POST", "/workers", {"url": "http://a :1"}, J, 400, "whitespace"),
    ("POST", "/workers", {"url": "http://" + "a" * 3000 + ":1"}, J, 400, "2048"),
    ("POST", "/workers", {"url": "a:1"}, {}, 415, "Content-Type"),
    ("POST", "/workers", {"url": "a:1"}, {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("GET", "/workers?status=bogus", None, {}, 400, "status"),
    ("GET", "/workers?worker_type=gpu", None, {}, 400, "worker_type"),
    ("GET", "/workers?colour=red", None, {}, 400, "colour"),
    ("GET", "/workers/not-a-uuid", None, {}, 400, "UUID"),
    ("PUT", "/workers/not-a-uuid", {"url": "a:1"}, J, 400, "UUID"),
    ("PATCH", "/workers/not-a-uuid", {"priority": 1}, J, 400, "UUID"),
    ("DELETE", "/workers/not-a-uuid", None, {}, 400, "UUID"),
    ("POST", "/workers/not-a-uuid/retry", None, {}, 400, "UUID"),
    ("GET", f"/workers/{ID}", None, {}, 404, ID),
    ("PUT", f"/workers/{ID}", {"url": "a:1"}, J, 404, ID),
    ("PATCH", f"/workers/{ID}", {"priority": 1}, J, 404, ID),
    ("DELETE", f"/workers/{ID}", None, {}, 404, ID),
    ("POST", f"/workers/{ID}/retry", None, {}, 404, ID),
    ("POST", f"/workers/{ID}/retry", {"force": True}, J, 400, "no body"),
    ("PATCH", f"/workers/{ID}", {"url": "a:1"}, J, 400, "url"),
    ("PATCH", f"/workers/{ID}", {"bogus": 1}, J, 400, "bogus"),
    ("PATCH", f"/workers/{ID}", {}, J, 400, "no field"),
    ("PATCH", f"/workers/{ID}", {"labels": {"k": 5}}, J, 400, "labels.k"),
    ("PUT", f"/workers/{ID}", {"priority": 1}, J, 400, "url"),
    ("DELETE", "/workers", None, {}, 405, "not allowed"),
    # intervals and timeouts below their minimums would be busy loops (README "Limits")
    (
        "POST",
        "/workers",
        {"url": "a:1", "health": {"check_interval_secs": 1e-9}},
        J,
        400,
        "health.check_interval_secs",
    ),
    (
        "POST",
        "/workers",
        {"url": "a:1", "health": {"timeout_secs": 1e-9}},
        J,
        400,
        "health.timeout_secs",
    ),
    (
        "POST",
        "/workers",
        {"url": "a:1", "recheck_interval_secs": 1e-9},
        J,
        400,
        "recheck_interval_secs",
    ),
    ("POST", "/workers", {"url": "a:1", "recheck_interval_secs": 0.5}, J, 400, "0 (off)"),
    (
        "POST",
        "/workers",
        {"url": "a:1", "registration_timeout_secs": 1e-9},
        J,
        400,
        "registration_timeout_secs",
    ),
    ("POST", "/workers", {"url": "a:1", "drain_timeout_secs": 1e10}, J, 400, "drain_timeout_secs"),
    (
        "POST",
        "/workers",
        {"url": "a:1", "max_connection_attempts": 10**6},
        J,
        400,
        "max_connection_attempts",
    ),
    (
        "PATCH",
        f"/workers/{ID}",
        {"health": {"check_interval_secs": 0.01}},
        J,
        400,
        "health.check_interval_secs",
    ),
    ("PATCH", f"/workers/{ID}", {"health": {"bogus": 1}}, J, 400, "health.bogus"),
    # a key that cannot be sent as a header (it used to crash the registrar)
    ("POST", "/workers", {"url": "a:1", "api_key": "ключ"}, J, 400, "api_key"),
    ("POST", "/workers", {"url": "a:1", "api_key": "a\r\nX: 1"}, J, 400, "api_key"),
    ("PATCH", f"/workers/{ID}", {"api_key": "two words"}, J, 400, "api_key"),
    # numbers the JSON decoder or a float cannot hold
    (
        "POST",
        "/workers",
        '{"url": "a:1", "priority": ' + "9" * 5000 + "}",
        J,
        400,
        "too many digits",
    ),
    ("POST", "/workers", '{"url": "a:1", "cost": ' + "9" * 400 + "}", J, 400, "too many digits"),
    ("POST", "/workers", '{"url": "a:1", "cost": ' + "9" * 40 + "}", J, 400, "cost"),
    ("POST", "/workers", '{"url": "a:1", "cost": 1e400}', J, 400, "cost"),
    # nesting beyond MAX_JSON_DEPTH
    (
        "POST",
        "/workers",
        '{"url": "a:1", "labels": ' + "[" * 1000 + "]" * 1000 + "}",
        J,
        400,
        "nested too deeply",
    ),
    ("POST", "/workers", "[" * 100_000 + "]" * 100_000, J, 400, "nested too deeply"),
    (
        "PUT",
        f"/workers/{ID}",
        '{"url": "a:1", "labels": ' + "[" * 1000 + "]" * 1000 + "}",
        J,
        400,
        "nested too deeply",
    ),
    (
        "PATCH",
        f"/workers/{ID}",
        '{"labels": ' + '{"a": ' * 5000 + "1" + "}" * 5001,
        J,
        400,
        "nested too deeply",
    ),
    (
        "PATCH",
        f"/workers/{ID}",
        '{"labels": ' + "[" * 32 + "]" * 32 + "}",
        J,
        400,
        "nested too deeply",
    ),
]


async def send(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    content = None if body is None else body if isinstance(body, str) else json.dumps(body)
    return await client.request(method, path, content=content, headers=headers)


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "text"), CASES)
async def test_malformed_input_gets_its_status_names_the_problem_and_changes_nothing(
    client: httpx.AsyncClient,
    gateway: Gateway,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    text: str,
) -> None:
    before = gateway.snapshot
    with trio.fail_after(10):
        answer = await send(client, method, path, body, headers)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert text in error["error"] or text in error.get("field", ""), error
    assert error["code"].isupper()
    assert gateway.snapshot is before  # nothing was published: the registry did not change


def _complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    length = [
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")[1:]
        if line.startswith(b"content-length:")
    ]
    return bool(found and length and len(body) >= length[0])


async def test_a_body_over_one_mebibyte_is_a_413_and_changes_nothing(
    base_url: str, gateway: Gateway
) -> None:
    # a raw socket, as the client sends the whole body before it reads the answer
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"url": "a:1", "labels": {"x": "y" * 2_000_000}}).encode()
    head = f"POST /workers HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    before = gateway.snapshot
    answer = b""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                # the gateway may answer and close before it has read everything
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head.encode() + body)

            nursery.start_soon(send)
            while not _complete(answer) and (chunk := await stream.receive_some()):
                answer += chunk
            nursery.cancel_scope.cancel()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413")
    error = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert error["code"] == "PAYLOAD_TOO_LARGE"
    assert "1048576" in error["error"]
    assert gateway.snapshot is before


async def test_a_put_naming_another_address_is_a_url_mismatch(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    with trio.fail_after(10):
        created = await client.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
        worker_id = created.json()["worker_id"]
        answer = await client.put(f"/workers/{worker_id}", json={"url": "127.0.0.1:1"})
        bad_etag = await client.patch(
            f"/workers/{worker_id}", json={"priority": 1}, headers={"If-Match": "abc"}
        )
    assert answer.status_code == 400
    assert answer.json()["code"] == "URL_MISMATCH"
    assert bad_etag.status_code == 400
    assert gateway.get_worker(worker_id).spec_version == 1


@pytest.fixture
async def guarded(gateway: Gateway, nursery: trio.Nursery) -> str:
    serve = partial(serve_api, gateway, bind="127.0.0.1:0", admin_api_key="s3cret")
    [url] = await nursery.start(serve)
    assert isinstance(url, str)
    return url


async def test_with_an_admin_key_mutations_need_it_and_reads_do_not(guarded: str) -> None:
    async with httpx.AsyncClient(base_url=guarded) as client:
        with trio.fail_after(10):
            missing = await client.post("/workers", json={"url": "127.0.0.1:1"})
            wrong = await client.post(
                "/workers", json={"url": "127.0.0.1:1"}, headers={"Authorization": "Bearer nope"}
            )
            right = await client.post(
                "/workers", json={"url": "127.0.0.1:1"}, headers={"Authorization": "Bearer s3cret"}
            )
            listed = await client.get("/workers")
            deleted = await client.delete(f"/workers/{right.json()['worker_id']}")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert wrong.status_code == 403
    assert "s3cret" not in wrong.text
    assert right.status_code == 202
    assert listed.status_code == 200
    assert listed.json()["total"] == 1
    assert deleted.status_code == 401


async def test_a_worker_api_key_is_never_returned(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    body = {"url": f"127.0.0.1:{worker.port}", "api_key": "sk-worker-secret"}
    with trio.fail_after(10):
        created = await client.post("/workers", json=body)
        worker_id = created.json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        texts = [created.text, (await client.get("/workers")).text]
        texts.append((await client.get(f"/workers/{worker_id}")).text)
        texts.append((await client.patch(f"/workers/{worker_id}", json={"api_key": "sk-2"})).text)
    assert all("sk-worker-secret" not in text and "sk-2" not in text for text in texts)
    assert "sk-worker-secret" not in repr(gateway.get_worker(worker_id))


async def test_the_openapi_description_is_valid_and_describes_real_answers(
    client: httpx.AsyncClient, gateway: Gateway, start_workers: StartWorkers
) -> None:
    [worker] = await start_workers(1)
    with trio.fail_after(10):
        document = (await client.get("/openapi.json")).json()
        created = await client.post("/workers", json={"url": f"127.0.0.1:{worker.port}"})
        worker_id = created.json()["worker_id"]
        await gateway.wait_status(worker_id, "ready", 5)
        one = (await client.get(f"/workers/{worker_id}")).json()
        listing = (await client.get("/workers")).json()
        error = (await client.get(f"/workers/{ID}")).json()
        page = await client.get("/docs")
    validate(document)  # a valid OpenAPI 3.1 document

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    check(created.json(), "Accepted")
    check(one, "WorkerInfo")
    check(listing, "WorkerList")
    check(error, "Error")
    check({"url": "a:1", "health": {"timeout_secs": 1}}, "WorkerSpec")
    with pytest.raises(jsonschema.ValidationError):
        check({"url": "a:1", "priorty": 1}, "WorkerSpec")
    assert set(document["paths"]) >= {"/workers", "/workers/{worker_id}", "/readiness"}
    assert page.status_code == 200
    assert "/openapi.json" in page.text


def test_the_openapi_schemas_name_exactly_the_fields_the_parser_accepts() -> None:
    assert set(SCHEMAS["WorkerSpec"]["properties"]) == set(SPEC_FIELDS)
    assert set(SCHEMAS["WorkerPatch"]["properties"]) == set(PATCH_FIELDS)
    assert set(SCHEMAS["HealthConfig"]["properties"]) == set(HEALTH_FIELDS)


def nested(depth: int) -> str:
    """A JSON object ``depth`` levels deep (the top object is level 1)."""
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def test_a_body_nested_to_the_limit_is_parsed_and_one_level_more_is_refused() -> None:
    assert json_depth(load_json_object(nested(MAX_JSON_DEPTH))) == MAX_JSON_DEPTH
    with pytest.raises(InvalidInput) as caught:
        load_json_object(nested(MAX_JSON_DEPTH + 1))
    assert (
        caught.value.message == f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
    )


def test_the_depth_of_a_json_value_is_counted_without_recursion() -> None:
    deep: list[object] = []
    for _ in range(100_000):  # far beyond the interpreter's recursion limit
        deep = [deep]

    assert json_depth(deep) == 100_001
    assert json_depth({"a": [1, {"b": []}], "c": 2}) == 4
    assert json_depth(5) == 0


@pytest.mark.parametrize(
    "body",
    [
        '{"priority": ' + "9" * 5000 + "}",
        '{"cost": -' + "1" * 5000 + ".5}",
        "[" * 100_000,
        b'{"url": "\xff"}',  # not UTF-8
        b"\xff\xfe\x00",
        '{"url": "a:1"} trailing',
        '{"cost": Infinity}',
    ],
)
def test_a_refused_body_is_described_without_interpreter_internals(body: str | bytes) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_json_object(body)

    message = caught.value.message
    for internal in ("sys.", "set_int_max_str_digits", "4300", "codec", "Recursion", "Python"):
        assert internal not in message
    assert message.startswith("the body ")
