"""serve_api(): run the HTTP API on hypercorn until told to stop; supports nursery.start."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from actors.service import Gateway
from api.app import create_app
from api.inference import inference_app


async def serve_api(
    gateway: Gateway,
    *,
    bind: str = "127.0.0.1:30000",
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    admin_api_key: str | None = None,
    graceful_timeout: float = 5.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or forever). ``nursery.start`` gets the list of
    bound URLs, e.g. ``["http://127.0.0.1:41234"]`` for ``bind="127.0.0.1:0"``."""
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 75.0
    config.include_server_header = False
    quart = create_app(gateway, admin_api_key=admin_api_key)
    app = inference_app(gateway, quart)  # type: ignore[arg-type]
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
