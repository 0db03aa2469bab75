"""Routing policies: which worker each request goes to, and how priority, cost and load count."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.core.model import Worker, WorkerId, WorkerSpec, WorkerStatus
from actors.core.urls import parse_worker_url
from actors.dataplane.prefix_cache import PrefixTree
from actors.dataplane.routing import (
    POLICIES,
    RR_SWEEP_EVERY,
    CacheAwareConfig,
    Router,
    RouteRequest,
)

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant. " * 3


def worker(worker_id: str, *, priority: int = 50, cost: float = 1.0) -> Worker:
    spec = WorkerSpec(url=parse_worker_url("h:1"), priority=priority, cost=cost)
    return Worker(
        id=worker_id,
        spec=spec,
        status=WorkerStatus.READY,
        created_at=0,
        updated_at=0,
        is_healthy=True,
    )


def idle(_: WorkerId) -> int:
    return 0


def loads(mapping: dict[str, int]) -> Callable[[WorkerId], int]:
    return lambda worker_id: mapping.get(worker_id, 0)


def route(
    router: Router,
    candidates: Sequence[Worker],
    count: int,
    request: RouteRequest | None = None,
    load: Callable[[WorkerId], int] = idle,
    policy: str | None = None,
) -> Counter[str]:
    request = request if request is not None else RouteRequest("m")
    return Counter(router.choose(request, candidates, load, policy=policy).id for _ in range(count))


ABC = [worker("a"), worker("b"), worker("c")]


# round_robin


def test_round_robin_spreads_requests_exactly_evenly_over_three_equal_workers() -> None:
    router = Router("round_robin")
    picks = [router.choose(RouteRequest("m"), ABC, idle).id for _ in range(300)]

    assert Counter(picks) == {"a": 100, "b": 100, "c": 100}
    assert all(len(set(picks[i : i + 3])) == 3 for i in range(0, 300, 3))


def test_round_robin_shares_are_proportional_to_priority_over_cost() -> None:
    by_priority = [worker("a", priority=10), worker("b", priority=20), worker("c", priority=30)]
    by_cost = [worker("a", cost=2.0), worker("b", cost=1.0), worker("c", cost=0.5)]

    assert route(Router(), by_priority, 600) == {"a": 100, "b": 200, "c": 300}
    assert route(Router(), by_cost, 700) == {"a": 100, "b": 200, "c": 400}


def test_round_robin_keeps_a_separate_rotation_per_model() -> None:
    router = Router()
    counts = {"m1": Counter[str](), "m2": Counter[str]()}
    for model in ["m1", "m1", "m2"] * 150:
        counts[model][router.choose(RouteRequest(model), ABC, idle).id] += 1

    assert counts["m1"] == {"a": 100, "b": 100, "c": 100}
    assert counts["m2"] == {"a": 50, "b": 50, "c": 50}


def test_round_robin_stays_even_when_workers_leave_rejoin_or_are_skipped_on_a_retry() -> None:
    router = Router()
    route(router, ABC, 31)

    without_c = route(router, ABC[:2], 200)
    assert abs(without_c["a"] - without_c["b"]) <= 2  # b was owed one from before
    assert route(router, ABC, 300) == {"a": 100, "b": 100, "c": 100}

    first, retried = Counter[str](), Counter[str]()
    for _ in range(300):  # b fails every request it gets; each is retried on the others
        chosen = router.choose(RouteRequest("m"), ABC, idle)
        first[chosen.id] += 1
        if chosen.id == "b":
            retried[router.choose(RouteRequest("m"), [ABC[0], ABC[2]], idle).id] += 1
    assert all(98 <= n <= 102 for n in first.values())
    assert all(47 <= n <= 53 for n in retried.values())


def test_round_robin_drops_the_state_of_workers_it_no_longer_sees() -> None:
    router = Router()
    route(router, [*ABC, worker("gone")], 8)
    route(router, ABC, RR_SWEEP_EVERY * 2)

    assert set(router._rr["m"].slots) == {"a", "b", "c"}


# random and power_of_two


def test_random_choice_is_roughly_proportional_to_weight() -> None:
    workers = [worker("a", priority=10), worker("b", priority=20), worker("c", priority=30)]
    counts = route(Router("random", rng=random.Random(7)), workers, 6000)

    assert 850 <= counts["a"] <= 1150
    assert 1750 <= counts["b"] <= 2250
    assert 2650 <= counts["c"] <= 3350


def test_random_choice_is_deterministic_given_the_rng() -> None:
    def picks(seed: int) -> list[str]:
        router = Router("random", rng=random.Random(seed))
        return [router.choose(RouteRequest("m"), ABC, idle).id for _ in range(50)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)


def test_power_of_two_prefers_less_loaded_workers() -> None:
    router = Router("power_of_two", rng=random.Random(3))
    counts = route(router, ABC, 3000, load=loads({"a": 10, "b": 0, "c": 5}))

    assert counts["a"] == 0  # the busiest loses every pair it is drawn into
    assert counts["b"] > counts["c"] > 0
    assert 1800 <= counts["b"] <= 2200  # b wins every pair it is in: 2 of 3 pairs


def test_power_of_two_never_picks_the_busier_of_two_equal_workers_when_the_other_is_idle() -> None:
    router = Router("power_of_two", rng=random.Random(5))
    a, b = worker("a"), worker("b")

    assert route(router, [a, b], 200, load=loads({"a": 3})) == {"b": 200}
    assert route(router, [a, b], 200, load=loads({"b": 1})) == {"a": 200}


def test_power_of_two_balances_in_flight_load_per_unit_of_weight() -> None:
    router = Router("power_of_two", rng=random.Random(11))
    workers = [worker("a", priority=25), worker("b", priority=50), worker("c", priority=100)]
    in_flight: Counter[str] = Counter()
    for _ in range(700):  # nothing completes, so the load is the number routed so far
        in_flight[router.choose(RouteRequest("m"), workers, in_flight.__getitem__).id] += 1

    assert 80 <= in_flight["a"] <= 120
    assert 180 <= in_flight["b"] <= 220
    assert 380 <= in_flight["c"] <= 420


# consistent_hash


def test_consistent_hash_sends_each_session_to_the_same_worker_every_time() -> None:
    router = Router("consistent_hash")
    owners = {}
    for key in (f"session-{i}" for i in range(200)):
        counts = route(router, ABC, 5, RouteRequest("m", session_key=key))
        assert len(counts) == 1
        owners[key] = next(iter(counts))

    assert set(Counter(owners.values())) == {"a", "b", "c"}
    assert all(n >= 30 for n in Counter(owners.values()).values())


def test_consistent_hash_gives_a_heavier_worker_more_sessions() -> None:
    router = Router("consistent_hash")
    workers = [worker("light", priority=50), worker("heavy", priority=100)]
    counts = Counter(
        router.choose(RouteRequest("m", session_key=f"k{i}"), workers, idle).id for i in range(3000)
    )

    assert 1.4 <= counts["heavy"] / counts["light"] <= 2.8


def test_consistent_hash_without_a_session_key_falls_back_to_round_robin() -> None:
    router = Router("consistent_hash")

    assert route(router, ABC, 300, RouteRequest("m")) == {"a": 100, "b": 100, "c": 100}
    assert route(router, ABC, 30, RouteRequest("m", session_key="")) == {
        "a": 10,
        "b": 10,
        "c": 10,
    }


def test_consistent_hash_is_the_same_in_every_process() -> None:
    script = (
        "from tests.test_routing import ABC, idle\n"
        "from actors.dataplane.routing import Router, RouteRequest\n"
        "r = Router('consistent_hash')\n"
        "print([r.choose(RouteRequest('m', session_key=f'k{i}'), ABC, idle).id"
        " for i in range(40)])\n"
    )

    def owners(seed: str) -> str:
        env = {"PYTHONHASHSEED": seed, "PATH": ""}
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, check=True
        )
        return done.stdout.decode()

    first = owners("1")
    assert first == owners("2")
    assert set(ast.literal_eval(first)) == {"a", "b", "c"}


worker_sets = st.lists(
    st.tuples(st.uuids().map(str), st.integers(min_value=1, max_value=100)),
    min_size=2,
    max_size=8,
    unique_by=lambda pair: pair[0],
)


@settings(max_examples=60, deadline=None)
@given(
    members=worker_sets,
    keys=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=60),
    gone=st.integers(min_value=0, max_value=7),
)
def test_when_a_worker_leaves_or_joins_only_its_own_sessions_move(
    members: list[tuple[str, int]], keys: list[str], gone: int
) -> None:
    everyone = [worker(worker_id, priority=priority) for worker_id, priority in members]
    leaver = everyone[gone % len(everyone)]
    rest = [w for w in everyone if w is not leaver]

    def owners(candidates: list[Worker], router: Router | None = None) -> dict[str, str]:
        router = router or Router("consistent_hash")  # by default no ring cached from before
        return {
            key: router.choose(RouteRequest("m", session_key=key), candidates, idle).id
            for key in keys
        }

    with_it, without_it = owners(everyone), owners(rest)

    for key in keys:
        if with_it[key] != leaver.id:
            assert without_it[key] == with_it[key]  # leaving moves only the leaver's sessions
        if without_it[key] != with_it[key]:
            assert with_it[key] == leaver.id  # joining takes sessions only to the joiner

    shared = Router("consistent_hash")  # the set without the leaver is served by the cached ring
    assert owners(everyone, shared) == with_it
    assert owners(rest, shared) == without_it
    assert owners(everyone, shared) == with_it


def test_a_session_key_that_is_not_valid_unicode_still_routes() -> None:
    router = Router("consistent_hash")
    request = RouteRequest("m", session_key="user-\ud800")

    assert router.choose(request, ABC, idle) is router.choose(request, ABC, idle)


def test_consistent_hash_caches_only_a_few_rings_per_model() -> None:
    router = Router("consistent_hash")
    workers = [worker(f"w{i}") for i in range(10)]
    for i in range(10):
        subset = workers[:i] + workers[i + 1 :]
        router.choose(RouteRequest("m", session_key="k"), subset, idle)

    assert 1 <= len(router._rings["m"]) <= 4


# cache_aware


def growing_load(in_flight: Counter[str]) -> Callable[[WorkerId], int]:
    return in_flight.__getitem__


def test_cache_aware_sends_prompts_sharing_a_long_prefix_to_the_same_worker() -> None:
    router = Router("cache_aware")
    in_flight: Counter[str] = Counter()  # grows by one per request, within the balance bounds
    for i in range(20):
        prompt = SYSTEM + f"Question {i}: what is {i} squared?"
        in_flight[
            router.choose(RouteRequest("m", prompt=prompt), ABC, in_flight.__getitem__).id
        ] += 1

    assert len(in_flight) == 1


def test_cache_aware_spreads_unrelated_prompts_by_load() -> None:
    router = Router("cache_aware")
    in_flight: Counter[str] = Counter()
    for i in range(30):
        prompt = f"{i} unrelated prompt number {i}, nothing shared"
        in_flight[
            router.choose(RouteRequest("m", prompt=prompt), ABC, in_flight.__getitem__).id
        ] += 1

    assert in_flight == {"a": 10, "b": 10, "c": 10}


def test_cache_aware_falls_back_to_the_least_loaded_when_one_worker_is_overloaded() -> None:
    router = Router("cache_aware")
    a, b = worker("a"), worker("b")
    request = RouteRequest("m", prompt=SYSTEM + "tell me a joke")
    assert router.choose(request, [a, b], idle) is a

    assert router.choose(request, [a, b], loads({"a": 40, "b": 30})) is a  # within bounds
    assert router.choose(request, [a, b], loads({"a": 100, "b": 80})) is a  # 100 - 80 <= 32
    assert router.choose(request, [a, b], loads({"a": 200, "b": 150})) is a  # 200 <= 1.5 * 150
    assert router.choose(request, [a, b], loads({"a": 100})) is b  # 100 - 0 > 32
    assert router.choose(request, [a, b], loads({"a": 200, "b": 100})) is b  # both thresholds


def test_cache_aware_ignores_a_match_shorter_than_the_threshold() -> None:
    router = Router("cache_aware", cache=CacheAwareConfig(cache_threshold=0.5))
    a, b = worker("a"), worker("b")
    router.choose(RouteRequest("m", prompt="shared start, then one long tail"), [a, b], idle)

    short = RouteRequest("m", prompt="shared start, but then a much much longer other tail")
    assert router.choose(short, [a, b], loads({"a": 1})) is b
    close = RouteRequest("m", prompt="shared start, then one long tale")
    assert router.choose(close, [a, b], loads({"a": 1})) is a


def test_cache_aware_without_a_prompt_picks_the_least_loaded_per_unit_of_weight() -> None:
    router = Router("cache_aware")
    light, heavy = worker("light", priority=50), worker("heavy", priority=100)

    assert (
        router.choose(RouteRequest("m"), [light, heavy], loads({"light": 2, "heavy": 3})) is heavy
    )
    assert (
        router.choose(RouteRequest("m"), [light, heavy], loads({"light": 2, "heavy": 5})) is light
    )
    assert router.choose(RouteRequest("m"), [light, heavy], idle) is heavy  # tie: higher weight
    assert router.cache_size("m") == 0


def test_cache_aware_memory_stays_bounded_however_many_prompts_arrive() -> None:
    limit = 10_000
    router = Router("cache_aware", cache=CacheAwareConfig(max_chars_per_model=limit))
    rng = random.Random(1)
    for i in range(3000):  # about 600,000 characters
        prompt = f"{i}:" + "".join(rng.choice("abcdefgh") for _ in range(200))
        router.choose(RouteRequest("m", prompt=prompt), ABC, idle)
        assert router.cache_size("m") <= limit

    assert router.cache_size("m") > limit // 2
    last = RouteRequest("m", prompt=prompt)
    owner = router.choose(last, ABC, idle)
    assert router.choose(last, ABC, loads({owner.id: 5})) is owner  # the newest is still known
    tree = router._trees["m"]
    assert tree.nodes <= tree.chars
    assert tree.heap_size <= 2 * tree.nodes + 65


def test_forget_removes_a_workers_cached_prompts() -> None:
    router = Router("cache_aware")
    a, b = worker("a"), worker("b")
    mine = RouteRequest("m", prompt=SYSTEM + "for a")
    theirs = RouteRequest("m", prompt="something else entirely, for b")
    assert router.choose(mine, [a, b], idle) is a
    assert router.choose(theirs, [a, b], loads({"a": 1})) is b
    assert router.choose(mine, [a, b], loads({"a": 5})) is a

    router.forget("a")

    only_theirs = Router("cache_aware")
    only_theirs.choose(theirs, [b], idle)
    assert router.cache_size("m") == only_theirs.cache_size("m") > 0
    assert router.choose(mine, [a, b], loads({"a": 5})) is b
    assert router.choose(theirs, [a, b], loads({"b": 5})) is b


# every policy


@pytest.mark.parametrize("policy", POLICIES)
def test_a_priority_0_worker_is_used_only_when_no_other_candidate_exists(policy: str) -> None:
    router = Router(policy, rng=random.Random(0))
    spare, busy = worker("spare", priority=0), worker("busy", priority=1, cost=9.0)
    busy_load = loads({"busy": 500})
    for i in range(100):
        request = RouteRequest("m", session_key=f"s{i}", prompt=f"p{i}")
        assert router.choose(request, [spare, busy], busy_load) is busy
        assert router.choose(request, [spare], busy_load) is spare

    spares = [spare, worker("spare2", priority=0)]
    requests = [RouteRequest("m", session_key=f"s{i}", prompt=f"p{i}") for i in range(100)]
    in_flight: Counter[str] = Counter()
    for request in requests:
        in_flight[router.choose(request, spares, in_flight.__getitem__).id] += 1
    assert set(in_flight) == {"spare", "spare2"}


def test_an_unknown_policy_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="least_busy"):
        Router("least_busy")
    with pytest.raises(ValueError, match="least_busy"):
        Router().choose(RouteRequest("m"), ABC, idle, policy="least_busy")


def test_no_candidates_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        Router().choose(RouteRequest("m"), [], idle)


@pytest.mark.parametrize(
    "fields",
    [
        {"cache_threshold": 1.5},
        {"balance_abs_threshold": -1},
        {"balance_rel_threshold": 0.5},
        {"max_chars_per_model": 0},
    ],
)
def test_a_cache_aware_config_out_of_range_is_a_value_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CacheAwareConfig(**fields)


def test_a_per_request_policy_overrides_the_default_for_that_request_only() -> None:
    router = Router("round_robin")
    sticky = RouteRequest("m", session_key="user-1")

    assert len(route(router, ABC, 9, sticky, policy="consistent_hash")) == 1
    assert route(router, ABC, 9, sticky) == {"a": 3, "b": 3, "c": 3}


def test_a_single_candidate_is_always_chosen() -> None:
    for policy in POLICIES:
        request = RouteRequest("m", session_key="k", prompt="p")
        assert Router(policy).choose(request, [ABC[1]], loads({"b": 99})) is ABC[1]


# the prefix tree itself


def common_length(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


recorded = st.lists(
    st.tuples(st.text("ab", min_size=1, max_size=12), st.sampled_from("xyz")), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(
    records=recorded,
    prompt=st.text("ab", min_size=1, max_size=12),
    pool=st.sets(st.sampled_from("xyz")),
)
def test_the_prefix_tree_finds_the_longest_prefix_any_candidate_served(
    records: list[tuple[str, str]], prompt: str, pool: set[str]
) -> None:
    tree = PrefixTree(max_chars=10_000)
    for text, worker_id in records:
        tree.record(text, worker_id)

    length, hits = tree.match(prompt, sorted(pool))

    best = {
        w: max((common_length(prompt, t) for t, o in records if o == w), default=0) for w in pool
    }
    longest = max(best.values(), default=0)
    assert length == longest
    assert set(hits) == ({w for w, n in best.items() if n == longest} if longest else set())


@settings(max_examples=200, deadline=None)
@given(
    records=recorded,
    limit=st.integers(min_value=12, max_value=80),
    node_chars=st.integers(min_value=0, max_value=3),
    gone=st.sampled_from("xyz"),
)
def test_the_prefix_tree_keeps_the_newest_prompt_within_its_bound_and_forgets_cleanly(
    records: list[tuple[str, str]], limit: int, node_chars: int, gone: str
) -> None:
    tree = PrefixTree(max_chars=limit, node_chars=node_chars)
    for text, worker_id in records:
        tree.record(text, worker_id)
        assert tree.size <= limit
        if len(text) * (1 + node_chars) <= limit // 2:  # the newest is evicted last
            assert tree.match(text, [worker_id])[0] == len(text)

    tree.forget(gone)

    assert all(gone not in tree.match(text, [gone])[1] for text, _ in records)
    assert tree.size <= limit


def test_the_prefix_tree_evicts_the_least_recently_used_prompt_first() -> None:
    tree = PrefixTree(max_chars=60, node_chars=0)
    tree.record("a" * 10, "w")
    tree.record("b" * 10, "w")
    tree.record("a" * 10, "w")  # a is now more recent than b
    tree.record("c" * 30, "w")  # 50 characters: fits
    tree.record("d" * 20, "w")  # 70: one must go

    assert tree.match("b" * 10, ["w"])[0] == 0
    assert tree.match("a" * 10, ["w"])[0] == 10
    assert tree.match("c" * 30, ["w"])[0] == 30
    assert tree.match("d" * 20, ["w"])[0] == 20


def test_prompts_that_branch_at_every_character_cannot_outgrow_the_bound() -> None:
    tree = PrefixTree(max_chars=4096)
    for n in range(5000):
        tree.record(format(n, "016b")[::-1], "w")  # a full binary tree of one-character edges

    assert tree.size <= 4096
    assert tree.nodes <= 4096 // tree.node_chars
    assert tree.heap_size <= 2 * tree.nodes + 65
