"""The Feed (actors/registry/feed.py): numbering, initial state, fan-out, overflow, resumes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import trio
import trio.testing

from actors import worker_spec
from actors.core.errors import InvalidInput
from actors.core.events import EventKind
from actors.registry.feed import Feed, Watch, WatchEvent, WatchOverflow
from actors.registry.service import Gateway
from tests.test_events import ready, snap, worker


def seen(event: WatchEvent) -> tuple[str, int, str | None]:
    return (event.kind.value, event.seq, event.worker.id[-2:] if event.worker else None)


def drain(events: Watch) -> list[tuple[str, int, str | None]]:
    out = []
    while (event := events.next_nowait()) is not None:
        out.append(seen(event))
    return out


async def test_a_watch_gives_the_current_state_then_synced_then_each_change_in_order() -> None:
    a, b = worker(1), ready(worker(2), "m")
    feed = Feed(snap(a, b), start=100)
    async with feed.watch() as events:
        first = await events.__anext__()
        assert first.initial and first.seq == 100
        assert drain(events) == [("ready", 100, "02"), ("synced", 100, None)]
        feed.publish(snap(a, b), snap(ready(a, "m"), b))
        feed.publish(snap(ready(a, "m"), b), snap(ready(a, "m")))
        assert seen(await events.__anext__()) == ("ready", 101, "01")
        assert drain(events) == [("removed", 102, "02")]
    assert seen(first) == ("created", 100, "01")
    assert feed.subscriber_count == 0


async def test_a_waiting_watcher_wakes_on_publish_and_a_cancelled_read_loses_nothing() -> None:
    feed = Feed(start=0)
    got: list[WatchEvent] = []
    async with feed.watch() as events:
        assert (await events.__anext__()).kind is EventKind.SYNCED
        with trio.move_on_after(0.01) as timer:  # a heartbeat-style timeout: nothing lost
            await events.__anext__()
        assert timer.cancelled_caught
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                got.append(await events.__anext__())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            feed.publish(snap(), snap(worker(1)))
    assert [seen(e) for e in got] == [("created", 1, "01")]


async def test_every_watcher_sees_the_same_numbered_events_and_numbers_only_grow() -> None:
    feed = Feed(start=7)
    states = [snap(), snap(worker(1)), snap(worker(1), worker(2)), snap(worker(2)), snap()]
    async with feed.watch() as one, feed.watch() as two:
        for previous, current in itertools.pairwise(states):
            feed.publish(previous, current)
        a, b = drain(one), drain(two)
    assert a == b
    assert [s for _, s, _ in a] == [7, 8, 9, 10, 11]
    assert feed.seq == 11


def test_a_feed_numbers_from_its_start_time_so_ids_of_an_earlier_process_are_older() -> None:
    earlier, later = Feed(), Feed()
    assert 0 < earlier.seq <= later.seq
    assert not later.resumable(later.seq - 1) and later.resumable(later.seq)


async def test_a_watcher_that_stops_reading_is_dropped_and_the_others_are_not() -> None:
    feed = Feed(start=0, subscriber_buffer=4)
    dropped: list[str] = []
    state = snap()
    async with feed.watch() as stuck, feed.watch() as reader:
        stuck.on_drop(lambda: dropped.append("stuck"))
        for n in range(1, 11):
            current = snap(*state.workers.values(), worker(n))
            feed.publish(state, current)  # synchronous: nothing here can wait for a reader
            state = current
            drain(reader)
            if n == 4:
                assert not stuck.dropped and feed.subscriber_count == 2
        assert dropped == ["stuck"] and stuck.dropped and feed.subscriber_count == 1
        with pytest.raises(WatchOverflow) as overflow:
            await stuck.__anext__()
        assert overflow.value.last_seq == 0
        assert not reader.dropped


async def test_since_resumes_from_the_history_or_resets_with_the_full_state() -> None:
    feed = Feed(start=0, history=4)
    a, b = worker(1), worker(2)
    feed.publish(snap(), snap(a))  # 1
    feed.publish(snap(a), snap(a, b))  # 2
    async with feed.watch(since=1) as resumed:
        assert drain(resumed) == [("created", 2, "02"), ("synced", 2, None)]
    async with feed.watch(since=2) as current:
        assert drain(current) == [("synced", 2, None)]
    for version in range(2, 6):  # 3..6: the history (4) no longer holds 2
        feed.publish(snap(a, b), snap(a, replace(b, spec_version=version)))
    for since in (1, 99, -1):  # too old, from elsewhere (ahead), or garbage
        async with feed.watch(since=since) as reset:
            assert drain(reset) == [
                ("reset", 6, None),
                ("created", 6, "01"),
                ("created", 6, "02"),
                ("synced", 6, None),
            ]
    async with feed.watch(since=2) as edge:  # the oldest cursor the ring still serves
        assert [kind for kind, _, _ in drain(edge)] == ["updated"] * 4 + ["synced"]


async def test_filters_match_before_or_after_so_a_worker_is_seen_leaving() -> None:
    feed = Feed(start=0)
    m, other = ready(worker(1), "m"), ready(worker(2), "x")
    prefill = worker(3, worker_type="prefill")
    feed.publish(snap(), snap(m, other, prefill))
    async with feed.watch(model="m") as by_model, feed.watch(worker_type="prefill") as by_type:
        assert drain(by_model) == [("ready", 3, "01"), ("synced", 3, None)]
        assert drain(by_type) == [("created", 3, "03"), ("synced", 3, None)]
        moved = ready(worker(1), "y")  # a PUT to another model
        feed.publish(snap(m, other, prefill), snap(moved, other, prefill))
        [(kind, _, _)] = drain(by_model)
        assert kind == "updated"
        assert drain(by_type) == []


async def test_bad_filters_are_invalid_input() -> None:
    feed = Feed()
    for kwargs in ({"worker_type": "gpu"}, {"model": ""}, {"since": "3"}):
        with pytest.raises(InvalidInput):
            async with feed.watch(**kwargs):  # type: ignore[arg-type]
                pass


async def test_close_ends_every_watch() -> None:
    feed = Feed()
    async with feed.watch() as events:
        assert (await events.__anext__()).kind is EventKind.SYNCED
        feed.close()
        assert [e async for e in events] == []


async def test_the_gateways_feed_has_each_change_before_the_ask_returns(gateway: Gateway) -> None:
    feed = gateway.feed
    async with feed.watch() as events:
        assert drain(events) == [("synced", feed.seq, None)]
        added = await gateway.add_worker(worker_spec("127.0.0.1:1", model_id="m"))
        [(kind, _, _)] = drain(events)  # read-your-writes: no wait needed
        assert kind == "created"
        await gateway.remove_worker(added.id)
        assert [k for k, _, _ in drain(events)] == ["removed"]
        assert gateway.snapshot.get(added.id) is None
