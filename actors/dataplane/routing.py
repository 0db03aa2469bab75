"""Routing policies: choose one worker for one request (pure, except the injected randomness).

The data plane owns one ``Router`` and calls ``choose`` for every request. Every policy is
deterministic given the ``random.Random`` it was handed.

Load is the gateway's in-flight count to a worker (requests and streams through this gateway:
the only load signal it has), compared per unit of weight: ``cost(w) = load(w) * 50 / weight(w)``,
in in-flight requests of a default worker (priority 50, cost 1).

How priority and cost weigh in. A candidate's weight is ``priority / cost``. Candidates with
priority 0 are dropped whenever any candidate has a priority above 0: priority 0 marks a worker of
last resort, used only when nothing else can serve. When every candidate has priority 0 they are
weighed as if at the default priority 50, i.e. by ``50 / cost``. Per policy:

* ``round_robin``: smooth weighted round robin (nginx's), per model: each pick adds every
  candidate's weight to its current value, picks the highest (ties: higher weight, then lower
  id) and subtracts the total weight from it. Shares are exactly proportional to weight over a
  cycle. State is kept per worker id, so a worker that is left out for a call (excluded on a
  retry, briefly unhealthy) keeps its place; ids not seen for ``RR_SWEEP_EVERY`` calls are dropped.
* ``random``: a random candidate with probability proportional to weight.
* ``power_of_two``: two distinct candidates drawn by weight; the lower ``load / weight`` wins
  (ties: higher weight, then lower id).
* ``consistent_hash``: a ring per model over the candidates, ``VNODES`` (160) virtual nodes for
  the default weight 50, scaled linearly by weight (1..``MAX_VNODES``); weights are absolute, so
  a worker joining or leaving moves only the keys it takes or had. The key is the session key
  (``x-session-id``, else ``user``); without one, ``round_robin``. Rings are cached per candidate
  set; a set missing up to ``RING_SKIP`` workers of a cached ring (a retry) walks past them.
* ``least_load``: the lowest ``cost(w)``; ties are broken by a weighted random draw among the
  tied (never by id, so new work spreads evenly over idle workers).
* ``cache_aware``: each candidate scores ``affinity(w) - cost(w)``; the highest score wins, ties
  by a weighted random draw. ``m(w)`` is the length in characters of the longest prefix of the
  prompt the worker served recently (in the per-model prefix tree, ``prefix_cache``), and
  ``affinity(w) = (m - min_match * len(prompt)) / affinity_chars`` when ``m`` is above that floor
  (``min_match``, 0.1 of the prompt), else 0: a small coincidental overlap ("You are a helpful
  assistant.") is worth nothing, so it does not pull new prompts to whoever served the first
  one. Affinity counts the characters whose prefill the worker saves, not a fraction of the
  prompt: ``affinity_chars`` (``AFFINITY_CHARS``, 500) characters of cached prefix are worth one
  request in flight, so a long history is worth its length, and a session stays with the worker
  holding its history rather than move to another holder of its system prompt that is slightly
  less busy (that move would prefill the whole history again). But affinity only counts for a
  worker whose cost is at most ``affinity_weight`` (``AFFINITY_WEIGHT``, 4) above the lowest:
  a busier one is ranked by load alone, whatever it holds. So a hot prefix stays on its holders
  until they have that many more requests in flight than the least loaded worker; then it goes
  to the least loaded worker, which is recorded as a holder too (it now caches the prefix), and
  later requests choose among all its holders (by what each holds, then by load): the prefix
  spreads over as many workers as its traffic needs. When the load passes, its holders win again
  (within the gap they outscore workers without it): back to affinity. A new prefix (no match
  anywhere) goes to the least loaded worker, ties drawn at random. The chosen worker's cost is
  at most ``affinity_weight`` above the lowest: no worker is sent more work while another has
  that many fewer requests in flight. Without a prompt: ``least_load``. Every prompt is recorded
  for the chosen worker. Memory: the tree is bounded by ``max_chars_per_model``; the holders of a
  node by the workers serving the model.
"""

from __future__ import annotations

import hashlib
import random
import struct
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from itertools import repeat

from actors.core.model import Worker, WorkerId
from actors.dataplane.prefix_cache import PrefixTree

# every policy's name: GatewayConfig.policy and `tmg serve --policy` take their choices from here
POLICIES = (
    "round_robin",
    "random",
    "power_of_two",
    "consistent_hash",
    "least_load",
    "cache_aware",
)
PROMPT_POLICIES = frozenset(("cache_aware",))  # these read the prompt
AFFINITY_WEIGHT = 4.0  # cache_aware: the most in-flight requests a cached prefix makes up for
AFFINITY_CHARS = 500.0  # cache_aware: characters of cached prefix worth one in-flight request
DEFAULT_PRIORITY = 50  # the weight of an all-priority-0 set is DEFAULT_PRIORITY / cost
MIN_COST = 1e-6  # keeps every weight finite
REFERENCE_WEIGHT = 50.0  # priority 50 at cost 1.0 gets VNODES virtual nodes
VNODES = 160
MAX_VNODES = 16 * VNODES
RINGS_PER_MODEL = 4
RING_SKIP = 2  # a cached ring with up to this many extra workers serves a smaller set
RR_SWEEP_EVERY = 256

Load = Callable[[WorkerId], int]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    session_key: str | None = None  # the x-session-id header, else the body's "user"
    prompt: str | None = None  # text for cache_aware (chat: the contents joined; else the prompt)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheAwareConfig:
    affinity_weight: float = AFFINITY_WEIGHT  # cache_aware: see the module docstring
    affinity_chars: float = AFFINITY_CHARS  # cache_aware: see the module docstring
    min_match: float = 0.1  # cache_aware: a match of at most this fraction of a prompt is ignored
    max_chars_per_model: int = 2_000_000  # characters of prompts remembered per model

    def __post_init__(self) -> None:
        if not (
            0.0 <= self.affinity_weight <= 1e6
            and 1.0 <= self.affinity_chars <= 1e9
            and 0.0 <= self.min_match < 1.0
            and self.max_chars_per_model >= 1
        ):
            raise ValueError(f"out of range: {self}")


def _hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike ``hash()``)."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def vnodes_for(weight: float) -> int:
    return max(1, round(VNODES * min(weight / REFERENCE_WEIGHT, MAX_VNODES / VNODES)))


class HashRing:
    """Virtual nodes of a set of ``(worker id, weight)``, sorted by their point on a 64-bit
    circle. A worker's points are the first ``vnodes_for(weight)`` 8-byte words of the SHAKE-128
    stream of its id, so they depend on nothing else (and a higher weight only adds points)."""

    __slots__ = ("members", "owners", "points")

    def __init__(self, members: frozenset[tuple[WorkerId, float]]) -> None:
        pairs: list[tuple[int, WorkerId]] = []
        for wid, weight in members:
            n = vnodes_for(weight)
            stream = hashlib.shake_128(wid.encode("utf-8", "surrogatepass")).digest(8 * n)
            pairs.extend(zip(struct.unpack(f">{n}Q", stream), repeat(wid, n), strict=True))
        pairs.sort()
        self.members = members
        self.points = [point for point, _ in pairs]
        self.owners = [owner for _, owner in pairs]

    def owner(self, key: str, allowed: Container[WorkerId] | None = None) -> WorkerId:
        """The worker of the first virtual node clockwise from the key's point; with
        ``allowed``, the first one allowed (the answer of a ring without the others)."""
        owners, start = self.owners, bisect_right(self.points, _hash64(key))
        for i in range(start, start + len(owners)):
            owner = owners[i % len(owners)]
            if allowed is None or owner in allowed:
                return owner
        raise ValueError("no allowed worker on the ring")


def _fair_best(rng: random.Random, scores: list[float], weights: list[float]) -> int:
    """The index of the highest score; ties: a draw proportional to weight among the tied."""
    top = max(scores)
    if scores.count(top) == 1:
        return scores.index(top)
    tied = [i for i, score in enumerate(scores) if score == top]
    tied_weights = [weights[i] for i in tied]
    if min(tied_weights) == max(tied_weights):
        return tied[rng.randrange(len(tied))]
    return tied[_draw(rng, tied_weights, sum(tied_weights))]


def _weighed(candidates: Sequence[Worker]) -> tuple[list[Worker], list[float]]:
    workers = [w for w in candidates if w.spec.priority > 0]
    if workers:
        return workers, [w.spec.priority / max(w.spec.cost, MIN_COST) for w in workers]
    workers = list(candidates)
    return workers, [DEFAULT_PRIORITY / max(w.spec.cost, MIN_COST) for w in workers]


def _draw(rng: random.Random, weights: list[float], total: float, skip: int = -1) -> int:
    """An index drawn with probability proportional to weight, never ``skip``."""
    r = rng.random() * total
    for i, weight in enumerate(weights):
        if i != skip:
            r -= weight
            if r < 0:
                return i
    return len(weights) - (2 if skip == len(weights) - 1 else 1)  # rounding left r at ~0


def _known(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; expected one of {POLICIES}")
    return policy


class _SmoothRoundRobin:
    __slots__ = ("calls", "slots")

    def __init__(self) -> None:
        self.slots: dict[WorkerId, list[float]] = {}  # id -> [current value, call last seen]
        self.calls = 0

    def pick(self, workers: list[Worker], weights: list[float]) -> Worker:
        self.calls += 1
        calls, slots = self.calls, self.slots
        best, best_slot, best_rank = workers[0], [0.0, 0.0], (0.0, 0.0, "")
        for worker, weight in zip(workers, weights, strict=True):
            slot = slots.get(worker.id)
            if slot is None:
                slot = slots[worker.id] = [0.0, 0.0]
            slot[0] += weight
            slot[1] = calls
            rank = (-slot[0], -weight, worker.id)  # the highest value, higher weight, lower id
            if rank < best_rank or best_slot[1] != calls:
                best, best_slot, best_rank = worker, slot, rank
        best_slot[0] -= sum(weights)
        if calls % RR_SWEEP_EVERY == 0:
            for wid in [w for w, slot in slots.items() if slot[1] <= calls - RR_SWEEP_EVERY]:
                del slots[wid]
        return best


class Router:
    """Chooses a worker for a request. Holds the policies' small mutable state (round-robin
    positions, cached hash rings, prefix trees). Owned by the data plane; used synchronously."""

    def __init__(
        self,
        policy: str = "round_robin",
        *,
        rng: random.Random | None = None,
        cache: CacheAwareConfig | None = None,
    ) -> None:
        self.policy = _known(policy)
        self.rng = rng if rng is not None else random.Random()
        self.cache = cache if cache is not None else CacheAwareConfig()
        self._rr: dict[str, _SmoothRoundRobin] = {}
        self._rings: dict[str, OrderedDict[frozenset[tuple[WorkerId, float]], HashRing]] = {}
        self._trees: dict[str, PrefixTree] = {}

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[Worker],
        load: Load,
        *,
        policy: str | None = None,
    ) -> Worker:
        """The worker for ``request``; ``policy`` overrides the default for this request."""
        name = self.policy if policy is None else _known(policy)
        if not candidates:
            raise ValueError("no candidates to choose from")
        workers, weights = _weighed(candidates)
        if name == "cache_aware":
            return self._cache_aware(request, workers, weights, load)
        if len(workers) == 1:
            return workers[0]
        if name == "least_load":
            return workers[self._least_load(workers, weights, load)]
        if name == "random":
            return workers[_draw(self.rng, weights, sum(weights))]
        if name == "power_of_two":
            return self._power_of_two(workers, weights, load)
        if name == "consistent_hash" and request.session_key:
            return self._consistent_hash(request.model, request.session_key, workers, weights)
        return self._round_robin(request.model, workers, weights)  # also consistent_hash, no key

    def forget(self, worker_id: WorkerId) -> None:
        """A worker left: drop its round-robin slot, the rings it is on and its cached prompts."""
        for rr in self._rr.values():
            rr.slots.pop(worker_id, None)
        for rings in self._rings.values():
            for members in [m for m in rings if any(wid == worker_id for wid, _ in m)]:
                del rings[members]
        for tree in self._trees.values():
            tree.forget(worker_id)

    def cache_size(self, model: str) -> int:
        """The size of what cache_aware remembers for ``model`` (see ``PrefixTree.size``)."""
        tree = self._trees.get(model)
        return tree.size if tree is not None else 0

    def _round_robin(self, model: str, workers: list[Worker], weights: list[float]) -> Worker:
        rr = self._rr.get(model)
        if rr is None:
            rr = self._rr[model] = _SmoothRoundRobin()
        return rr.pick(workers, weights)

    def _power_of_two(self, workers: list[Worker], weights: list[float], load: Load) -> Worker:
        total = sum(weights)
        i = _draw(self.rng, weights, total)
        j = _draw(self.rng, weights, total - weights[i], skip=i)
        a, b = workers[i], workers[j]
        rank_a = (load(a.id) / weights[i], -weights[i], a.id)
        return a if rank_a < (load(b.id) / weights[j], -weights[j], b.id) else b

    def _consistent_hash(
        self, model: str, key: str, workers: list[Worker], weights: list[float]
    ) -> Worker:
        members = frozenset(zip([w.id for w in workers], weights, strict=True))
        rings = self._rings.setdefault(model, OrderedDict())
        ring, allowed = rings.get(members), None
        if ring is None:  # a ring with a few more workers (e.g. those tried) answers the same
            allowed = {w.id for w in workers}
            extra = [r for r in rings.values() if members < r.members]
            ring = next((r for r in extra if len(r.members) - len(members) <= RING_SKIP), None)
        if ring is None:
            ring = rings[members] = HashRing(members)
            if len(rings) > RINGS_PER_MODEL:
                rings.popitem(last=False)
        rings.move_to_end(ring.members)
        owner = ring.owner(key, allowed)
        return next(w for w in workers if w.id == owner)

    def _least_load(self, workers: list[Worker], weights: list[float], load: Load) -> int:
        scores = [-load(w.id) / weight for w, weight in zip(workers, weights, strict=True)]
        return _fair_best(self.rng, scores, weights)

    def _cache_aware(
        self, request: RouteRequest, workers: list[Worker], weights: list[float], load: Load
    ) -> Worker:
        prompt = request.prompt
        if not prompt:
            return workers[self._least_load(workers, weights, load) if len(workers) > 1 else 0]
        tree = self._trees.get(request.model)
        if tree is None:
            tree = self._trees[request.model] = PrefixTree(self.cache.max_chars_per_model)
        best = 0
        if len(workers) > 1:
            scores = [
                -load(w.id) * REFERENCE_WEIGHT / weight
                for w, weight in zip(workers, weights, strict=True)
            ]
            lengths = tree.match_lengths(prompt, [w.id for w in workers])
            if lengths:
                config = self.cache
                floor = config.min_match * len(prompt)  # in characters
                scale = 1.0 / config.affinity_chars
                cap = max(scores) - config.affinity_weight  # busier: no affinity, whatever it holds
                for i, worker in enumerate(workers):
                    matched = lengths.get(worker.id)
                    if matched is not None and matched > floor and scores[i] >= cap:
                        scores[i] += (matched - floor) * scale
            best = _fair_best(self.rng, scores, weights)
        tree.record(prompt, workers[best].id)
        return workers[best]
