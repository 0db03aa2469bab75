"""serve_api(): run the HTTP API until told to stop; supports nursery.start.

Two servers can carry it: ``http1`` (api/http/server.py, the default: built for the proxy's hot
path) and ``hypercorn`` (the general-purpose ASGI server; about half the proxied throughput here).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from actors.registry.service import Gateway
from api.app import create_app
from api.events import events_app
from api.http.server import ServerLimits, serve_http1
from api.inference import inference_app

SERVERS = ("http1", "hypercorn")


async def serve_api(
    gateway: Gateway,
    *,
    bind: str = "127.0.0.1:30000",
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    admin_api_key: str | None = None,
    graceful_timeout: float | None = None,
    server: str = "http1",
    max_connections: int | None = None,
    write_timeout: float | None = None,
    reuse_port: bool = False,
    own_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or forever). ``nursery.start`` gets the list of
    bound URLs, e.g. ``["http://127.0.0.1:41234"]`` for ``bind="127.0.0.1:0"``.
    ``max_connections`` (None: derived from the open-file limit) and ``write_timeout`` apply to
    the http1 server only; a limit left at None takes ``ServerLimits``' default; so do
    ``reuse_port`` and ``own_port`` (``serve_http1``: several processes on one port)."""
    limits = ServerLimits(max_connections=max_connections)
    if graceful_timeout is not None:
        limits = replace(limits, graceful_timeout=graceful_timeout)
    if write_timeout is not None:
        limits = replace(limits, write_timeout=write_timeout)
    quart = create_app(gateway, admin_api_key=admin_api_key)
    app = inference_app(gateway, events_app(gateway, quart))  # type: ignore[arg-type]
    if server == "http1":
        host, _, port = bind.rpartition(":")
        await serve_http1(
            app,  # type: ignore[arg-type]
            host=host.strip("[]"),
            port=int(port),
            shutdown_trigger=shutdown_trigger,
            limits=limits,
            reuse_port=reuse_port,
            own_port=own_port,
            task_status=task_status,
        )
        return
    if reuse_port or own_port:
        raise ValueError("reuse_port and own_port need the http1 server")
    if server != "hypercorn":
        raise ValueError(f"server must be one of {', '.join(SERVERS)}, not {server!r}")
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = limits.graceful_timeout
    config.keep_alive_timeout = limits.keep_alive_timeout
    config.include_server_header = False
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
