"""``GET /workers/events``: the registry's change feed as server-sent events (API.md section 3).

A raw ASGI route in front of the Quart app, like the inference routes, rather than a Quart
route: the handler owns ``send``, so a subscriber that the feed drops for not reading is cut at
once (the write it is blocked in is cancelled and the connection closed) instead of holding its
connection until the server's write timeout; it batches what is ready into one write; and no
Quart request context or response timeout sits around a stream that lasts for hours.

The stream (``text/event-stream``), one event per block::

    event: ready            <- initial state: one per worker, the kind of its status; no id
    data: {WorkerInfo}
                            <- ... every worker that matches the filters
    id: 1733390000000042    <- then the marker, with the head's sequence number
    event: synced
    data: {"seq": 1733390000000042}

    id: 1733390000000043    <- then every change, in order
    event: updated
    data: {WorkerInfo}

``data`` is the WorkerInfo JSON exactly as ``GET /workers/{id}`` renders it (``load`` as of the
moment it is written; a ``removed`` event carries the worker's last record). Initial-state
events carry no ``id:`` on purpose: a client that disconnects in the middle of the initial state
reconnects with the id it had before (none, or an older one) and gets the whole state again;
only ``synced`` and the changes move its ``Last-Event-ID``.

* ``Last-Event-ID`` (or ``?last_event_id=``): the changes after it from the feed's bounded
  history, then ``synced``; when the history no longer reaches back to it (or it is not a
  number, or from another process): ``event: reset`` (``data: {"seq": ...}``, no id), the full
  state, and ``synced``.
* ``?model=``, ``?worker_type=``: the filters of ``GET /workers``; a change is sent when the
  worker matched before or after it. Unknown parameters or bad values: 400 in the management
  error shape.
* A ``: heartbeat`` comment after 15 s without an event (``HEARTBEAT_SECS``).
* A client that stops reading falls behind the feed and is dropped (``actors/registry/feed.py``):
  the connection is closed; it reconnects with its ``Last-Event-ID``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import trio

from actors.core.errors import InvalidInput
from actors.core.events import EventKind
from actors.registry.feed import Watch, WatchEvent, WatchOverflow, check_filters
from actors.registry.service import Gateway
from api.inference import CANCEL_ON_DISCONNECT
from api.render import error_body, render_error, render_worker

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/workers/events"
PARAMETERS = ("model", "worker_type", "last_event_id")
HEARTBEAT_SECS = 15.0
HEARTBEAT = b": heartbeat\n\n"
WRITE_BATCH = 64 * 1024  # events ready at once go out in writes of about this size


def events_app(gateway: Gateway, fallback: ASGIApp) -> ASGIApp:
    """Serve ``GET /workers/events``; everything else goes to ``fallback``."""
    return _EventsApp(gateway, fallback)


class _EventsApp:
    def __init__(self, gateway: Gateway, fallback: ASGIApp) -> None:
        self._gateway = gateway
        self._fallback = fallback
        self._feed = gateway.feed  # from now on: resumes reach back to here
        self._common = [
            (b"x-tmg-gateway", gateway.config.instance_id.encode("ascii")),
            (b"cache-control", b"no-cache"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            return await self._fallback(scope, receive, send)
        if scope["method"] != "GET":
            body = error_body(f"use GET {PATH}", "METHOD_NOT_ALLOWED")
            return await self._json(send, 405, body, [(b"allow", b"GET")])
        try:
            model, worker_type, since = self._parameters(scope)
            check_filters(model, worker_type, since)
        except InvalidInput as error:
            return await self._json(send, 400, render_error(error))
        async with self._feed.watch(model=model, worker_type=worker_type, since=since) as events:
            extensions = scope.get("extensions")
            if extensions is not None and CANCEL_ON_DISCONNECT in extensions:
                await self._stream(events, send)  # the server cancels us on disconnect
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                    await self._stream(events, send)
                    nursery.cancel_scope.cancel()

    async def _stream(self, events: Watch, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), *self._common]
        with trio.CancelScope() as cut:
            events.on_drop(cut.cancel)  # dropped: the blocked write is cancelled, conn closed
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send(
                {"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True}
            )
            while True:
                with trio.move_on_after(HEARTBEAT_SECS):
                    try:
                        first = await events.__anext__()
                    except StopAsyncIteration:  # the gateway is stopping: end the answer
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        return
                    except WatchOverflow:
                        return  # unfinished: the server closes the connection
                    parts = [self._encode(first)]
                    size = len(parts[0])
                    while size < WRITE_BATCH and (event := events.next_nowait()) is not None:
                        parts.append(self._encode(event))
                        size += len(parts[-1])
                    await send(
                        {"type": "http.response.body", "body": b"".join(parts), "more_body": True}
                    )
                    continue
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})

    def _encode(self, event: WatchEvent) -> bytes:
        kind = event.kind.value.encode()
        worker = event.worker
        if worker is None:  # a marker
            data = b'{"seq": %d}' % event.seq
            if event.kind is EventKind.RESET:
                return b"event: reset\ndata: " + data + b"\n\n"
            return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, kind, data)
        rendered = render_worker(worker, load=self._gateway.inflight.count(worker.id))
        data = json.dumps(rendered).encode()
        if event.initial:
            return b"event: " + kind + b"\ndata: " + data + b"\n\n"
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, kind, data)

    @staticmethod
    def _parameters(scope: Scope) -> tuple[str | None, str | None, int | None]:
        query = scope.get("query_string", b"").decode("latin-1")
        args: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name not in PARAMETERS:
                accepted = ", ".join(PARAMETERS)
                raise InvalidInput(name, f"unknown query parameter (accepted: {accepted})")
            if name in args:
                raise InvalidInput(name, "is given more than once")
            args[name] = value
        last = args.get("last_event_id")
        for name, value in scope["headers"]:
            if name == b"last-event-id":
                last = value.decode("latin-1")
        since: int | None = None
        if last is not None and last.strip():
            text = last.strip()
            # not a number we gave out: resume from nowhere, i.e. reset and the full state
            since = int(text) if text.isdigit() and len(text) <= 20 else -1
        return args.get("model"), args.get("worker_type"), since

    async def _json(
        self, send: Send, status: int, body: object, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        data = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(data)),
            (b"x-tmg-gateway", self._common[0][1]),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Servers that do not cancel the app on disconnect (hypercorn): a watcher does it."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
