"""ask(), Reply and refuse_pending(): every envelope gets an answer on every path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from actors.core.commands import Ask
from actors.core.errors import GatewayStopped, WorkerNotFound
from actors.registry.mailbox import Envelope, Inbox, ask, refuse_pending


@dataclass(frozen=True)
class Double(Ask[int]):
    value: int


async def doubler(inbox: Inbox, *, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    async with inbox:
        async for envelope in inbox:
            message = envelope.message
            assert isinstance(message, Double)
            with envelope.reply:
                if message.value < 0:
                    envelope.reply.answer(outcome.Error(WorkerNotFound("negative")))
                elif message.value == 0:
                    continue  # leaves without answering: the asker must still hear back
                else:
                    envelope.reply.answer(outcome.Value(message.value * 2))


async def test_ask_returns_the_answer_or_raises_the_actors_error(nursery: trio.Nursery) -> None:
    send, receive = trio.open_memory_channel[Envelope[Any]](4)
    await nursery.start(doubler, receive)
    assert await ask(send, Double(21)) == 42
    with pytest.raises(WorkerNotFound):
        await ask(send, Double(-1))


async def test_an_envelope_left_unanswered_answers_gateway_stopped(nursery: trio.Nursery) -> None:
    send, receive = trio.open_memory_channel[Envelope[Any]](4)
    await nursery.start(doubler, receive)
    with pytest.raises(GatewayStopped):
        await ask(send, Double(0))


async def test_queued_asks_are_refused_when_the_actor_stops() -> None:
    send, receive = trio.open_memory_channel[Envelope[Any]](4)
    failures: list[BaseException] = []

    async def asker() -> None:
        try:
            await ask(send, Double(1))
        except GatewayStopped as error:
            failures.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        refuse_pending(receive)
    assert len(failures) == 2


async def test_asking_a_closed_inbox_raises_gateway_stopped() -> None:
    send, receive = trio.open_memory_channel[Envelope[Any]](4)
    await receive.aclose()
    with pytest.raises(GatewayStopped):
        await ask(send, Double(1))
