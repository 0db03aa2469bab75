"""The one request/reply mechanism between actors: ``ask()`` an actor, get its answer.

An envelope carries a message and a one-shot reply slot. The actor answers every envelope on
every path: ``with envelope.reply:`` answers ``GatewayStopped`` if the block exits without an
answer, and ``refuse_pending()`` answers whatever is still queued when the actor stops. Answering
never blocks, so an actor never awaits the party that asked it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

import outcome
import trio

from actors.core.commands import Ask
from actors.core.errors import GatewayStopped

T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer slot. Cheaper than a memory channel per ask."""

    __slots__ = ("_event", "_result")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._result: outcome.Outcome[T] | None = None

    def answer(self, result: outcome.Outcome[T]) -> None:
        if self._result is None:
            self._result = result
            self._event.set()

    def refuse(self) -> None:
        """Answer GatewayStopped unless already answered."""
        if self._result is None:
            self.answer(outcome.Error(GatewayStopped()))

    async def wait(self) -> T:
        await self._event.wait()
        assert self._result is not None
        return self._result.unwrap()

    def __enter__(self) -> Reply[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.refuse()


@dataclass(slots=True)
class Envelope(Generic[T]):
    message: Ask[T]
    reply: Reply[T] = field(default_factory=Reply)


Inbox = trio.MemoryReceiveChannel[Envelope[Any]]
Outbox = trio.MemorySendChannel[Envelope[Any]]


async def ask(outbox: Outbox, message: Ask[T]) -> T:
    """Send ``message`` to the actor behind ``outbox`` and return its answer (or raise its
    error). Raises GatewayStopped if the actor has stopped.

    Only the send can wait long (a full inbox: backpressure); an actor answers at once, so a
    caller that needs a bound puts it around ``deliver`` (see ``Gateway._ask``)."""
    return await (await deliver(outbox, message)).wait()


async def deliver(outbox: Outbox, message: Ask[T]) -> Reply[T]:
    """Put ``message`` in the inbox (waiting for room if it is full); its Reply to await."""
    reply = post(outbox, message)
    if reply is None:
        envelope: Envelope[T] = Envelope(message)
        try:
            await outbox.send(envelope)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise GatewayStopped() from None
        reply = envelope.reply
    return reply


def post(outbox: Outbox, message: Ask[T]) -> Reply[T] | None:
    """Put ``message`` in the inbox now (no checkpoint); None when the inbox is full."""
    envelope: Envelope[T] = Envelope(message)
    try:
        outbox.send_nowait(envelope)
    except trio.WouldBlock:
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise GatewayStopped() from None
    return envelope.reply


async def tell(outbox: Outbox, message: Ask[T]) -> None:
    """Send ``message`` without waiting for the answer (for news whose answer changes
    nothing for the sender). Raises GatewayStopped if the actor has stopped."""
    try:
        await outbox.send(Envelope(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise GatewayStopped() from None


def refuse_pending(inbox: Inbox) -> None:
    """Answer GatewayStopped to every envelope still queued (an actor calls this as it stops)."""
    while True:
        try:
            envelope = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        envelope.reply.answer(outcome.Error(GatewayStopped()))
