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


# least_load


def test_least_load_picks_the_fewest_in_flight_per_unit_of_weight() -> None:
    router = Router("least_load", rng=random.Random(0))
    light, heavy = worker("light", priority=50), worker("heavy", priority=100)

    assert (
        router.choose(RouteRequest("m"), [light, heavy], loads({"light": 2, "heavy": 3})) is heavy
    )
    assert (
        router.choose(RouteRequest("m"), [light, heavy], loads({"light": 2, "heavy": 5})) is light
    )


def test_least_load_breaks_ties_at_random_never_by_id() -> None:
    fleet = [worker(f"w{i}") for i in range(8)]
    counts = route(Router("least_load", rng=random.Random(3)), fleet, 8000)

    assert set(counts) == {w.id for w in fleet}
    assert all(850 <= n <= 1150 for n in counts.values()), counts


def test_least_load_ties_are_drawn_by_weight() -> None:
    double, single = worker("double", priority=100), worker("single", priority=50)
    counts = route(Router("least_load", rng=random.Random(4)), [double, single], 6000)

    assert 3700 <= counts["double"] <= 4300


def test_least_load_fills_every_worker_evenly_as_requests_pile_up() -> None:
    router = Router("least_load", rng=random.Random(5))
    fleet = [worker(f"w{i}") for i in range(8)]
    in_flight: Counter[str] = Counter()
    for _ in range(80):
        in_flight[router.choose(RouteRequest("m"), fleet, in_flight.__getitem__).id] += 1
        assert max(in_flight[w.id] for w in fleet) - min(in_flight[w.id] for w in fleet) <= 1

    assert set(in_flight.values()) == {10}


# cache_aware


FLEET = [worker(f"w{i}") for i in range(8)]
HOT = "You are the support agent of a large bank. " * 20 + "Customer: where is my card?"


def prompt_of(system: int, session: int, turn: int) -> str:
    history = "".join(f" [s{session} t{t}] question and answer {t}" * 4 for t in range(turn + 1))
    return f"System prompt {system}: " + f"rules of system {system}. " * 40 + history


def cache_router(**fields: Any) -> Router:
    # the prompts here are short (tens to hundreds of characters, not thousands): at 10 characters
    # per request in flight a cached one outweighs the load gap, as a real prompt does at 500
    config = CacheAwareConfig(**{"affinity_chars": 10.0, **fields})
    return Router("cache_aware", rng=random.Random(0), cache=config)


def test_cache_aware_keeps_sessions_on_the_worker_that_cached_them_at_even_load() -> None:
    router = cache_router()
    owner: dict[int, str] = {}
    for turn in range(4):
        for session in range(16):
            chosen = router.choose(
                RouteRequest("m", prompt=prompt_of(session, session, turn)), FLEET, idle
            )
            assert owner.setdefault(session, chosen.id) == chosen.id

    assert len(set(owner.values())) == 8  # sixteen new prefixes spread over all eight workers


def test_cache_aware_places_new_prefixes_on_the_least_loaded_worker_with_fair_ties() -> None:
    router = cache_router()
    rng = random.Random(2)
    counts: Counter[str] = Counter()
    for _ in range(4000):
        prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(120))
        counts[router.choose(RouteRequest("m", prompt=prompt), FLEET, idle).id] += 1

    assert all(400 <= n <= 600 for n in counts.values()), counts  # never the lowest id
    busy = loads({w.id: 3 for w in FLEET if w.id != "w5"})
    assert (
        router.choose(RouteRequest("m", prompt="a brand new prompt " * 5), FLEET, busy).id == "w5"
    )


def test_cache_aware_spreads_a_hot_prefix_once_its_owner_is_busy_and_records_the_new_holder() -> (
    None
):
    router = cache_router()
    hot = RouteRequest("m", prompt=HOT)
    owner = router.choose(hot, FLEET, idle)
    in_flight: Counter[str] = Counter()
    in_flight[owner.id] = 4  # the owner is busier, but by no more than affinity_weight
    assert router.choose(hot, FLEET, in_flight.__getitem__) is owner

    in_flight[owner.id] = 5  # now by more: the next request goes to an idle worker
    second = router.choose(hot, FLEET, in_flight.__getitem__)
    assert second is not owner
    in_flight[second.id] = 1  # both hold the prefix now: the less busy of the two takes it
    assert router.choose(hot, FLEET, in_flight.__getitem__) is second
    assert router._trees["m"].match_lengths(HOT, [owner.id, second.id]) == {
        owner.id: len(HOT),
        second.id: len(HOT),
    }


def test_a_hot_prefix_under_growing_load_spreads_over_as_many_workers_as_it_needs() -> None:
    router = cache_router()
    in_flight: Counter[str] = Counter()
    for i in range(64):  # requests pile up: none finishes
        chosen = router.choose(
            RouteRequest("m", prompt=HOT + f" #{i}"), FLEET, in_flight.__getitem__
        )
        in_flight[chosen.id] += 1
        assert max(in_flight[w.id] for w in FLEET) - min(in_flight[w.id] for w in FLEET) <= 5

    assert set(in_flight) == {w.id for w in FLEET}  # no worker stays idle while others queue


def test_cache_aware_returns_to_affinity_when_the_load_passes() -> None:
    router = cache_router()
    first = RouteRequest("m", prompt=prompt_of(1, 1, 0))
    owner = router.choose(first, FLEET, idle)
    peak = loads({owner.id: 9})
    spilled = router.choose(RouteRequest("m", prompt=prompt_of(1, 1, 1)), FLEET, peak)
    assert spilled is not owner

    holders = {owner.id, spilled.id}
    for turn in range(2, 12):  # the peak is over: the session stays on the workers holding it
        request = RouteRequest("m", prompt=prompt_of(1, 1, turn))
        assert router.choose(request, FLEET, loads({w: 1 for w in holders})).id in holders
    assert router.choose(RouteRequest("m", prompt=prompt_of(1, 1, 12)), FLEET, idle).id in holders


def test_no_worker_stays_idle_while_another_queues_on_a_recorded_hot_spot() -> None:
    # two hot prompts, three times the traffic of the rest, on a fleet that finishes requests:
    # the recorded situation in which the previous cache_aware built a 30-deep queue
    router = cache_router()
    rng = random.Random(9)
    in_flight: Counter[str] = Counter()
    running: list[tuple[int, str]] = []
    systems = [f"System {k}: " + f"instructions number {k}. " * 30 for k in range(12)]
    worst = 0
    for tick in range(3000):
        running = [(end, w) for end, w in running if end > tick or in_flight.subtract([w])]
        k = rng.choice([0, 0, 0, 1, 1, 1, *range(2, 12)])
        prompt = systems[k] + f"user {rng.randrange(50)} asks question {tick}"
        chosen = router.choose(RouteRequest("m", prompt=prompt), FLEET, in_flight.__getitem__)
        in_flight[chosen.id] += 1
        running.append((tick + 12, chosen.id))  # 12 ticks per request: about 12 in flight
        worst = max(
            worst, max(in_flight[w.id] for w in FLEET) - min(in_flight[w.id] for w in FLEET)
        )

    assert worst <= 5  # affinity_weight 4, plus the request being placed
    hot_holders = router._trees["m"].match_lengths(systems[0], [w.id for w in FLEET])
    assert len(hot_holders) >= 2  # the hot prompt was spread


def test_a_match_below_min_match_counts_for_nothing() -> None:
    a, b = worker("a"), worker("b")
    short = RouteRequest("m", prompt="shared start, but then a much much longer other tail")
    for min_match, expected in ((0.5, b), (0.1, a)):  # "shared start, " is 27 % of it
        router = cache_router(min_match=min_match, affinity_weight=40, affinity_chars=1)
        router.choose(RouteRequest("m", prompt="shared start, then one long tail"), [a], idle)
        assert router.choose(short, [a, b], loads({"a": 1})) is expected


def test_cache_aware_weighs_load_per_unit_of_weight() -> None:
    router = cache_router()
    light, heavy = worker("light", priority=50), worker("heavy", priority=100)
    request = RouteRequest("m", prompt=HOT)
    router.choose(request, [light], idle)  # light holds the prompt

    assert router.choose(request, [light, heavy], loads({"light": 4, "heavy": 1})) is light
    assert router.choose(request, [light, heavy], loads({"light": 5, "heavy": 3})) is light
    assert router.choose(request, [light, heavy], loads({"light": 5, "heavy": 1})) is heavy
    assert (
        router.choose(RouteRequest("m"), [light, heavy], loads({"light": 1, "heavy": 1})) is heavy
    )


def test_cache_aware_memory_stays_bounded_however_many_prompts_and_holders() -> None:
    limit = 10_000
    router = cache_router(max_chars_per_model=limit)
    rng = random.Random(1)
    in_flight: Counter[str] = Counter()
    for i in range(3000):  # about 600,000 characters, a hot one spread over every worker
        prompt = (
            HOT if i % 3 == 0 else f"{i}:" + "".join(rng.choice("abcdefgh") for _ in range(200))
        )
        chosen = router.choose(RouteRequest("m", prompt=prompt), FLEET, in_flight.__getitem__)
        in_flight[chosen.id] = (in_flight[chosen.id] + 1) % 7
        assert router.cache_size("m") <= limit

    tree = router._trees["m"]
    assert tree.nodes <= tree.chars
    assert tree.heap_size <= 2 * tree.nodes + 65
    assert len(tree.match_lengths(HOT, [w.id for w in FLEET])) == 8
    for w in FLEET[1:]:
        router.forget(w.id)
    assert tree.match_lengths(HOT, [w.id for w in FLEET]) == {"w0": len(HOT)}


def test_cache_aware_forget_removes_a_workers_cached_prompts() -> None:
    router = cache_router()
    a, b = worker("a"), worker("b")
    mine = RouteRequest("m", prompt=SYSTEM + "for a")
    router.choose(mine, [a], idle)
    assert router.choose(mine, [a, b], loads({"a": 3})) is a

    router.forget("a")

    assert router.cache_size("m") == 0
    assert router.choose(mine, [a, b], loads({"a": 1})) is b


# the prefix tree's per-worker match


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.text("ab", min_size=1, max_size=12), st.sampled_from("xyz")), max_size=30
    ),
    prompt=st.text("ab", min_size=1, max_size=12),
    pool=st.sets(st.sampled_from("xyz")),
)
def test_the_prefix_tree_tells_each_candidate_how_much_of_a_prompt_it_served(
    records: list[tuple[str, str]], prompt: str, pool: set[str]
) -> None:
    tree = PrefixTree(max_chars=10_000)
    for text, worker_id in records:
        tree.record(text, worker_id)

    lengths = tree.match_lengths(prompt, sorted(pool))

    best = {
        w: max((common_length(prompt, t) for t, o in records if o == w), default=0) for w in pool
    }
    assert lengths == {w: n for w, n in best.items() if n}


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
        {"affinity_weight": -1.0},
        {"affinity_chars": 0.5},
        {"min_match": 1.0},
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
