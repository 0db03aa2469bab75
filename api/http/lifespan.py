"""The ASGI lifespan protocol, run around a server (api/http/server.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

log = logging.getLogger("tmg.http")
Message = dict[str, Any]
ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan protocol around serving (startup before, shutdown after). An app
    that does not speak it (returns or raises on the lifespan scope) is served without it."""
    to_app_send, to_app = trio.open_memory_channel[Message](2)
    from_app_send, from_app = trio.open_memory_channel[Message](2)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}

    async def run() -> None:
        try:
            await app(scope, to_app.receive, from_app_send.send)
        except Exception as error:
            log.debug("the app has no lifespan support (%r): serving without it", error)
        from_app_send.close()  # the app is done with lifespan: tell whoever waits

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await to_app_send.send({"type": "lifespan.startup"})
        try:
            answer = await from_app.receive()
        except trio.EndOfChannel:
            answer = None  # no lifespan support
        if answer is not None and answer["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {answer.get('message', answer)}")
        yield  # on cancellation the app's lifespan task is cancelled with us: no shutdown
        if answer is not None:
            with trio.move_on_after(5):
                await to_app_send.send({"type": "lifespan.shutdown"})
                await from_app.receive()
        nursery.cancel_scope.cancel()
