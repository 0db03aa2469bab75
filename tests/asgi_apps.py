"""ASGI apps for the HTTP/1 server tests, and ``serve``: one of them behind api/http/server.py
on port 0."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from api.http.server import serve_http1

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNKS = (b"one", b"two", b"three")  # what /stream sends, in three pieces


class App:
    """A tiny ASGI app: echoes by default; a few paths misbehave on purpose."""

    def __init__(self) -> None:
        self.gate = trio.Event()  # /stream waits on it after one chunk, /slow before answering
        self.entered = trio.Event()  # /slow has been called
        self.endless_done = trio.Event()  # /endless has stopped (normally or not)
        self.lifespan: list[str] = []
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.lifespan.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.lifespan.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path: str = scope["path"]
        self.paths.append(path)
        if path == "/raise":
            raise RuntimeError("a deliberate failure")
        if path == "/silent":
            return
        if path == "/204":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": CHUNKS[0], "more_body": True})
            await self.gate.wait()
            for chunk in CHUNKS[1:]:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/endless":
            try:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for _ in range(200):  # 12.8 MB: far more than the socket buffers hold
                    body = b"x" * 65536
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                self.endless_done.set()
            return
        if path == "/slow":
            self.entered.set()
            await self.gate.wait()
        await self.echo(scope, receive, send)

    async def echo(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        answer = json.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "raw_path": scope["raw_path"].decode("latin-1"),
                "query_string": scope["query_string"].decode("latin-1"),
                "http_version": scope["http_version"],
                "headers": [
                    [n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]
                ],
                "body": body.decode("latin-1"),
                "client": scope["client"][0],
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


class BodyLengths:
    """Records the length of every request body it receives whole; answers 204."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.lengths.append(len((await receive())["body"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def serve(nursery: trio.Nursery, app: Any, **options: Any) -> str:
    serving = functools.partial(serve_http1, app, host="127.0.0.1", port=0, **options)
    [url] = await nursery.start(serving)
    assert isinstance(url, str)
    return url
