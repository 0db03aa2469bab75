"""The fake worker's cache model: the pure prefix cache, and its timing on trio's virtual clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from scripts.fake_cache import (
    PrefixCache,
    ServiceTimes,
    block_hashes,
    look_up,
    prompt_text,
    tokenize,
)
from scripts.fake_worker import Admission, CacheSimulator, FakeWorkerConfig


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def text(*parts: list[str]) -> str:
    return " ".join(w for part in parts for w in part)


# ---- pure: blocks, hits, eviction ----


def test_tokens_are_whitespace_words_and_only_whole_blocks_get_a_hash() -> None:
    assert tokenize("  a b\n\tc  ") == ["a", "b", "c"]
    assert len(block_hashes(words("w", 15), 4)) == 3  # the trailing 3 tokens make no block
    assert len(block_hashes(words("w", 16), 4)) == 4
    assert block_hashes(words("w", 3), 4) == []
    with pytest.raises(ValueError):
        block_hashes(["a"], 0)


def test_a_block_hash_covers_the_whole_prefix_before_it() -> None:
    a = block_hashes(["x", "y", "same", "block"], 2)
    b = block_hashes(["z", "y", "same", "block"], 2)
    assert a[1] != b[1]  # the second blocks are equal, their prefixes are not
    assert block_hashes(["x", "y", "other", "end"], 2)[0] == a[0]
    assert block_hashes(["ab", "c"], 1) != block_hashes(["a", "bc"], 1)  # word boundaries count


def test_cached_tokens_are_the_longest_run_of_leading_blocks_present() -> None:
    cache = PrefixCache(100)
    system, first, second = words("s", 10), words("u", 7), words("v", 9)
    cache.insert(block_hashes(tokenize(text(system, first)), 4))  # 17 tokens: 4 blocks
    same = look_up(cache, text(system, first), 4)
    assert (same.prompt_tokens, same.cached_tokens, same.uncached_tokens) == (17, 16, 1)
    follow_up = look_up(cache, text(system, first, second), 4)
    assert (follow_up.prompt_tokens, follow_up.cached_tokens) == (26, 16)
    other = look_up(cache, text(system, second), 4)
    assert other.cached_tokens == 8  # blocks 0-1 are all system; block 2 mixes s8 s9 v0 v1
    assert look_up(cache, text(words("x", 30)), 4).cached_tokens == 0


def test_a_missing_block_ends_the_match_even_if_later_blocks_are_held() -> None:
    hashes = block_hashes(words("w", 12), 4)
    cache = PrefixCache(10)
    cache.insert([hashes[0], hashes[2]])
    assert cache.match(hashes) == 1
    assert PrefixCache(10).match(hashes) == 0


def test_eviction_takes_the_least_recently_used_block_first() -> None:
    a = block_hashes(words("a", 8), 4)  # two blocks each
    b = block_hashes(words("b", 8), 4)
    c = block_hashes(words("c", 8), 4)
    cache = PrefixCache(4)
    cache.insert(a)
    cache.insert(b)
    cache.insert(a)  # touch a: b is now the least recent
    cache.insert(c)
    assert cache.match(a) == 2
    assert cache.match(b) == 0
    assert cache.match(c) == 2
    assert cache.evictions == 2


def test_leaves_are_evicted_before_their_prefix() -> None:
    blocks = block_hashes(words("w", 16), 4)
    cache = PrefixCache(4)
    cache.insert(blocks)
    assert cache.blocks() == [blocks[3], blocks[2], blocks[1], blocks[0]]  # least recent first
    cache.insert(block_hashes(words("x", 4), 4))  # one more block: the deepest leaf goes
    assert cache.match(blocks) == 3


def test_a_prompt_longer_than_the_cache_keeps_its_leading_blocks() -> None:
    blocks = block_hashes(words("w", 40), 4)  # 10 blocks into room for 3
    cache = PrefixCache(3)
    cache.insert(blocks)
    assert len(cache) == 3
    assert cache.match(blocks) == 3
    assert PrefixCache(0).match(blocks) == 0
    zero = PrefixCache(0)
    zero.insert(blocks)
    assert len(zero) == 0


def test_the_prompt_is_the_chat_contents_joined_or_the_prompt() -> None:
    chat = {"messages": [{"role": "system", "content": "a b"}, {"role": "user", "content": "c"}]}
    assert prompt_text(chat) == "a b c"
    assert prompt_text({"prompt": "x y"}) == "x y"
    assert prompt_text({"prompt": ["x", "y"]}) == "x y"
    assert prompt_text({"messages": [{"role": "user", "content": [{"type": "text"}]}]}) == ""
    assert prompt_text({"model": "m"}) is None
    assert prompt_text([1]) is None


def test_service_times_charge_uncached_prefill_and_decode_after_the_first_token() -> None:
    times = ServiceTimes(prefill_ms_per_token=0.5, decode_ms_per_token=10.0)
    assert times.prefill_secs(200) == pytest.approx(0.1)
    assert times.decode_secs(11) == pytest.approx(0.1)
    assert times.decode_secs(1) == times.decode_secs(0) == 0


def test_the_model_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError):
        FakeWorkerConfig(cache_blocks=10, slots=0)
    with pytest.raises(ValueError):
        FakeWorkerConfig(cache_blocks=-1)
    FakeWorkerConfig(slots=0)  # the model is off: not checked


# ---- timed, on the virtual clock ----


def simulator(**options: object) -> CacheSimulator:
    config = FakeWorkerConfig(cache_blocks=1000, block_tokens=4, **options)  # type: ignore[arg-type]
    return CacheSimulator(config)


async def serve(
    sim: CacheSimulator,
    prompt: str,
    hold: float,
    done: dict[str, tuple[float, Admission]],
    name: str,
) -> None:
    """Admit ``prompt``; record when its prefill ended (its first token) and its admission."""
    start = trio.current_time()
    async with sim.admit(prompt) as admission:
        done[name] = (trio.current_time() - start, admission)
        await trio.sleep(hold)


async def test_time_to_first_token_is_the_prefill_of_the_uncached_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = simulator(prefill_ms_per_token=10.0)
    done: dict[str, tuple[float, Admission]] = {}
    prompt = text(words("w", 42))  # 10 whole blocks and 2 tokens
    await serve(sim, prompt, 0, done, "cold")
    await serve(sim, prompt, 0, done, "warm")
    cold_ttft, cold = done["cold"]
    warm_ttft, warm = done["warm"]
    assert cold_ttft == pytest.approx(0.42)
    assert (cold.prompt_tokens, cold.cached_tokens, cold.queue_secs) == (42, 0, 0)
    assert warm_ttft == pytest.approx(0.02)
    assert warm.cached_tokens == 40
    assert warm.prefill_secs == pytest.approx(0.02)
    assert sim.stats()["cached_tokens"] == 40


async def test_prefills_run_k_at_a_time_and_the_others_queue_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = simulator(prefill_ms_per_token=10.0, prefill_slots=2, slots=8)
    done: dict[str, tuple[float, Admission]] = {}
    async with trio.open_nursery() as nursery:
        for i in range(5):  # 10 uncached tokens each: 0.1 s of prefill
            nursery.start_soon(serve, sim, text(words(f"p{i}-", 10)), 1.0, done, str(i))
            await trio.testing.wait_all_tasks_blocked()
    ttft = {name: round(t, 6) for name, (t, _) in done.items()}
    assert ttft == {"0": 0.1, "1": 0.1, "2": 0.2, "3": 0.2, "4": 0.3}
    queued = {name: round(a.queue_secs, 6) for name, (_, a) in done.items()}
    assert queued == {"0": 0, "1": 0, "2": 0.1, "3": 0.1, "4": 0.2}
    for t, admission in done.values():  # TTFT = queue + prefill
        assert t == pytest.approx(admission.queue_secs + admission.prefill_secs)


async def test_beyond_its_slots_a_request_waits_until_one_is_released(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = simulator(prefill_ms_per_token=10.0, prefill_slots=4, slots=2)
    done: dict[str, tuple[float, Admission]] = {}
    async with trio.open_nursery() as nursery:
        for i in range(3):  # 0.1 s prefill, then 1 s holding the slot (decoding)
            nursery.start_soon(serve, sim, text(words(f"p{i}-", 10)), 1.0, done, str(i))
            await trio.testing.wait_all_tasks_blocked()
        assert (sim.running, sim.waiting) == (2, 1)
    assert done["2"][0] == pytest.approx(1.2)  # waited for the first slot (1.1 s), then prefilled
    assert done["2"][1].queue_secs == pytest.approx(1.1)
    assert (sim.running, sim.waiting) == (0, 0)


async def test_a_follow_up_queued_behind_its_prefix_finds_it_cached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = simulator(prefill_ms_per_token=10.0, prefill_slots=1)
    done: dict[str, tuple[float, Admission]] = {}
    system = words("s", 40)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, sim, text(system), 0, done, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(serve, sim, text(system, words("u", 8)), 0, done, "second")
    assert done["second"][1].cached_tokens == 40  # looked up when its prefill began
    assert done["second"][0] == pytest.approx(0.4 + 0.08)


async def test_a_request_cancelled_while_queued_leaves_no_trace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = simulator(prefill_ms_per_token=10.0, slots=1)
    done: dict[str, tuple[float, Admission]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, sim, text(words("a", 10)), 5.0, done, "holder")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1.0):
            await serve(sim, text(words("b", 10)), 0, done, "gave up")
        assert (sim.running, sim.waiting) == (1, 0)
    assert "gave up" not in done
    assert look_up(sim.cache, text(words("b", 10)), 4).cached_tokens == 0
