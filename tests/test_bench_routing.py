"""scripts/bench_routing.py's trace generator and oracle (no timed benchmark here)."""

from __future__ import annotations

import itertools

import pytest

from scripts.bench_routing import Results, figures
from scripts.routing_trace import (
    HOT_FACTOR,
    Session,
    make_trace,
    oracle_hit_rate,
    parse_load,
    prompt_of,
    session_count,
)


def test_a_seed_always_gives_the_same_trace_and_another_seed_another() -> None:
    assert make_trace(7, 40, 20.0) == make_trace(7, 40, 20.0)
    assert make_trace(7, 40, 20.0) != make_trace(8, 40, 20.0)


def test_the_trace_has_a_dozen_long_system_prompts_and_growing_multi_turn_sessions() -> None:
    trace = make_trace(1, 60, 20.0)
    assert len(trace.systems) == 12
    assert all(400 < len(s.split()) <= 801 for s in trace.systems)
    assert len(trace.sessions) == 60
    assert [s.start_secs for s in trace.sessions] == sorted(s.start_secs for s in trace.sessions)
    assert all(0 <= s.start_secs <= 20.0 for s in trace.sessions)
    for session in trace.sessions:
        assert 3 <= len(session.turns) <= 7
        assert session.turns[0].think_secs == 0
        prompts = [prompt_of(trace.messages(session, i)) for i in range(len(session.turns))]
        assert prompts[0].startswith(trace.systems[session.system])
        for earlier, later in itertools.pairwise(prompts):
            assert later.startswith(earlier)  # the history only grows
        second = trace.messages(session, 1)
        assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
        assert second[2]["content"] == session.turns[0].assistant
        assert 16 <= session.turns[0].max_tokens <= 48
    thinks = [t.think_secs for s in trace.sessions for t in s.turns[1:]]
    assert 0.8 < sum(thinks) / len(thinks) < 2.5  # exponential, mean 1.5 s


def test_the_hot_phase_gives_two_prompts_more_traffic_inside_its_window() -> None:
    trace = make_trace(3, 2000, 20.0)
    lo, hi = trace.hot_window
    assert len(trace.hot) == 2
    assert 0 not in trace.hot  # never the most popular prompt
    inside = [s for s in trace.sessions if lo <= s.start_secs < hi]
    outside = [s for s in trace.sessions if not lo <= s.start_secs < hi]

    def share(sessions: list[Session], prompt: int) -> float:
        return sum(s.system == prompt for s in sessions) / len(sessions)

    for prompt in trace.hot:
        ratio = share(inside, prompt) / share(outside, prompt)
        assert HOT_FACTOR * 0.6 < ratio < HOT_FACTOR * 1.6
    rate_inside = len(inside) / (hi - lo)
    rate_outside = len(outside) / (20.0 - (hi - lo))
    assert rate_inside > 1.1 * rate_outside  # the hot prompts' extra sessions raise the load
    popular = max(range(12), key=lambda p: share(outside, p))
    assert popular == 0  # skewed: the first prompt is the most used


def test_the_oracle_misses_only_first_uses_new_turn_text_and_partial_blocks() -> None:
    trace = make_trace(1, 30, 20.0)
    best = oracle_hit_rate(trace, 16)
    assert 0.5 < best < 1.0
    assert oracle_hit_rate(trace, 1) > best  # finer blocks lose less at the ends
    assert oracle_hit_rate(make_trace(1, 1, 20.0), 16) < best  # one session: fewer shared uses


def test_loads_are_factors_of_the_base_rate_or_session_counts() -> None:
    assert parse_load("2x") == ("2x", 2.0, None)
    assert parse_load("150") == ("150", None, 150)
    assert session_count("2x", 20.0) == 2 * session_count("1x", 20.0)
    assert session_count("1x", 40.0) == 2 * session_count("1x", 20.0)
    assert session_count("17", 20.0) == 17
    for bad in ("0x", "0", "-1x", "many"):
        with pytest.raises(ValueError):
            parse_load(bad)


def test_figures_give_hit_rate_percentiles_and_imbalance() -> None:
    results = Results(ttft=[0.1, 0.2, 0.3, 0.4], e2e=[1.0] * 4, queue_ms=[0, 0, 10, 20])
    results.prompt_tokens, results.cached_tokens = 1000, 250
    results.per_worker.update({"a": 3, "b": 1})
    line = figures(results, wall=2.0)
    assert line["hit_rate"] == 0.25
    assert line["ttft_ms"] == {"p50": 200.0, "p99": 400.0}
    assert line["turns_per_sec"] == 2.0
    assert line["imbalance"] == 1.5
    assert line["errors"] == {}
