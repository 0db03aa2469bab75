"""The seeded trace scripts/bench_routing.py replays, and the best hit rate any router could get
on it (pure: no I/O). See bench_routing.py's docstring for the trace's shape and the oracle."""

from __future__ import annotations

import bisect
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from scripts.fake_cache import PrefixCache, block_hashes, tokenize

BASE_SESSIONS = 60  # sessions per 20 s of arrivals at load 1x
BASE_WINDOW = 20.0
HOT_FACTOR = 3.0
HOT_WINDOW = (0.4, 0.7)  # share of the arrival window
ZIPF_EXPONENT = 0.6


# ---- the trace (pure) ----


@dataclass(frozen=True, slots=True)
class Turn:
    user: str
    assistant: str  # appended to the history for the next turns; its length is max_tokens
    think_secs: float  # before this turn (0 for the first)

    @property
    def max_tokens(self) -> int:
        return len(tokenize(self.assistant))


@dataclass(frozen=True, slots=True)
class Session:
    number: int
    start_secs: float
    system: int  # index of its system prompt
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class Trace:
    seed: int
    systems: tuple[str, ...]
    weights: tuple[float, ...]
    hot: tuple[int, ...]
    hot_window: tuple[float, float]  # seconds
    sessions: tuple[Session, ...]

    def messages(self, session: Session, turn: int) -> list[dict[str, str]]:
        """The chat messages of ``session``'s turn ``turn`` (0-based)."""
        messages = [{"role": "system", "content": self.systems[session.system]}]
        for earlier in session.turns[:turn]:
            messages.append({"role": "user", "content": earlier.user})
            messages.append({"role": "assistant", "content": earlier.assistant})
        messages.append({"role": "user", "content": session.turns[turn].user})
        return messages

    def nominal_order(self) -> list[tuple[float, Session, int]]:
        """Every turn with its nominal send time (start + think times), in time order."""
        turns = []
        for session in self.sessions:
            at = session.start_secs
            for i, turn in enumerate(session.turns):
                at += turn.think_secs
                turns.append((at, session, i))
        turns.sort(key=lambda t: (t[0], t[1].number, t[2]))
        return turns


def _vocabulary(rng: random.Random, size: int = 2000) -> list[str]:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def _text(rng: random.Random, vocabulary: list[str], n: int) -> str:
    return " ".join(rng.choices(vocabulary, k=n))


def make_trace(
    seed: int,
    sessions: int,
    duration: float,
    *,
    prompts: int = 12,
    think_secs: float = 1.5,
) -> Trace:
    """A seeded trace (module docstring): the same arguments always give the same trace."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    systems = tuple(
        f"system-{i} " + _text(rng, vocabulary, rng.randint(400, 800)) for i in range(prompts)
    )
    weights = tuple(1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(prompts))
    hot = tuple(sorted(rng.sample(range(1, prompts), 2))) if prompts > 2 else ()
    lo, hi = HOT_WINDOW[0] * duration, HOT_WINDOW[1] * duration
    total = sum(weights)
    hot_total = total + (HOT_FACTOR - 1) * sum(weights[i] for i in hot)
    # arrival density: proportional to the total weight at that time (3x for hot prompts)
    masses = [lo * total, (hi - lo) * hot_total, (duration - hi) * total]
    edges = [0.0, masses[0], masses[0] + masses[1], sum(masses)]
    starts = []
    for _ in range(sessions):
        u = rng.random() * edges[3]
        part = min(2, bisect.bisect_right(edges, u) - 1)
        begin, width = (0.0, lo, hi)[part], (lo, hi - lo, duration - hi)[part]
        starts.append(begin + (u - edges[part]) / masses[part] * width if masses[part] else begin)
    starts.sort()
    made = []
    for number, start in enumerate(starts):
        hot_now = lo <= start < hi
        chooser = [w * (HOT_FACTOR if hot_now and i in hot else 1) for i, w in enumerate(weights)]
        system = rng.choices(range(prompts), weights=chooser)[0]
        turns = []
        for t in range(rng.randint(3, 7)):
            user = f"user-{number}-{t} " + _text(rng, vocabulary, rng.randint(15, 60))
            assistant = _text(rng, vocabulary, rng.randint(16, 48))
            think = rng.expovariate(1 / think_secs) if t else 0.0
            turns.append(Turn(user, assistant, round(think, 6)))
        made.append(Session(number, round(start, 6), system, tuple(turns)))
    return Trace(seed, systems, weights, hot, (lo, hi), tuple(made))


def prompt_of(messages: Sequence[dict[str, str]]) -> str:
    """The text the fake worker tokenizes: the contents joined by spaces."""
    return " ".join(m["content"] for m in messages)


def oracle_hit_rate(trace: Trace, block_tokens: int) -> float:
    """The best possible hit rate on ``trace`` (module docstring): one unlimited cache."""
    seen = PrefixCache(capacity_blocks=sys.maxsize)
    prompt = cached = 0
    for _, session, turn in trace.nominal_order():
        tokens = tokenize(prompt_of(trace.messages(session, turn)))
        hashes = block_hashes(tokens, block_tokens)
        prompt += len(tokens)
        cached += seen.match(hashes) * block_tokens
        seen.insert(hashes)
    return cached / prompt if prompt else 0.0


def parse_load(spec: str) -> tuple[str, float | None, int | None]:
    """``"2x"`` → (label, factor 2.0, None); ``"150"`` → (label, None, 150 sessions)."""
    if spec.endswith("x"):
        factor = float(spec[:-1])
        if factor <= 0:
            raise ValueError("a load factor must be above 0")
        return spec, factor, None
    count = int(spec)
    if count < 1:
        raise ValueError("at least one session")
    return spec, None, count


def session_count(spec: str, duration: float) -> int:
    _, factor, count = parse_load(spec)
    if count is not None:
        return count
    assert factor is not None
    return max(1, round(BASE_SESSIONS * factor * duration / BASE_WINDOW))
