"""The long-poll of ``GET /workers/{id}?wait_for=<status>&timeout_secs=N``.

``parse_wait`` reads the query (``None``: a plain GET); ``wait_for_status`` answers as soon as
the worker has the status, at once when it has it already, and after ``timeout`` seconds with
the record as it is then and ``timed_out=True`` (the route adds ``X-Wait-Timed-Out: true``). A
worker that is, or gets, removed raises ``WorkerNotFound`` (404). The wait wakes on the
snapshot that changes this worker's record (the gateway's per-worker wait, no polling), so the
answer leaves in the same scheduler pass as the change. A ``failed`` worker does not end a wait
for ``ready``: it may still come back (recheck, retry) within the timeout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from actors.core.errors import InvalidInput
from actors.core.model import Worker, WorkerId, WorkerStatus
from actors.registry.service import Gateway

MAX_TIMEOUT_SECS = 300.0
DEFAULT_TIMEOUT_SECS = 30.0
PARAMETERS = ("wait_for", "timeout_secs")
TIMED_OUT_HEADER = "X-Wait-Timed-Out"


@dataclass(frozen=True, slots=True)
class Wait:
    status: WorkerStatus
    timeout: float


def parse_wait(args: Mapping[str, str]) -> Wait | None:
    """The long-poll parameters of a ``GET /workers/{id}`` query, or None for a plain GET.
    Unknown parameters, a bad status, a bad timeout, or a timeout without ``wait_for`` are
    ``InvalidInput`` (400)."""
    for name in args:
        if name not in PARAMETERS:
            raise InvalidInput(name, f"unknown query parameter (accepted: {', '.join(PARAMETERS)})")
    raw_status = args.get("wait_for")
    raw_timeout = args.get("timeout_secs")
    if raw_status is None:
        if raw_timeout is not None:
            raise InvalidInput("timeout_secs", "is only accepted with wait_for")
        return None
    try:
        status = WorkerStatus(raw_status)
    except ValueError:
        allowed = ", ".join(member.value for member in WorkerStatus)
        raise InvalidInput(
            "wait_for", f"must be one of {allowed}, not {raw_status[:80]!r}"
        ) from None
    timeout = DEFAULT_TIMEOUT_SECS
    if raw_timeout is not None:
        try:
            timeout = float(raw_timeout) if len(raw_timeout) <= 32 else math.nan
        except ValueError:
            timeout = math.nan
        if not 0 <= timeout <= MAX_TIMEOUT_SECS:  # NaN fails too
            raise InvalidInput(
                "timeout_secs", f"must be a number of seconds from 0 to {MAX_TIMEOUT_SECS:g}"
            )
    return Wait(status, timeout)


async def wait_for_status(
    gateway: Gateway,
    worker_id: WorkerId,
    status: WorkerStatus,
    timeout: float,  # noqa: ASYNC109 - the route's parameter, bounded above
) -> tuple[Worker, bool]:
    """``(worker, timed_out)``; raises WorkerNotFound if the worker is or gets removed."""
    worker = await gateway.find_worker(worker_id)
    with trio.move_on_after(timeout):
        while worker.status is not status:
            await gateway._wait_worker_changed(worker_id)
            worker = gateway.get_worker(worker_id)
        return worker, False
    return gateway.get_worker(worker_id), True
