"""Circuit breakers: open after consecutive failures, one probe after the cool-down."""

from __future__ import annotations

from actors.dataplane.breaker import BreakerConfig, BreakerState, CircuitBreakers

CONFIG = BreakerConfig(failure_threshold=3, cooldown_secs=10.0)


def test_a_worker_is_routed_until_its_failures_reach_the_threshold() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(2):
        breakers.failed("w", now=0.0)
        assert breakers.allows("w", now=0.0)
    breakers.failed("w", now=1.0)
    assert not breakers.allows("w", now=1.0)
    assert breakers.states() == {"w": BreakerState.OPEN}


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breakers = CircuitBreakers(CONFIG)
    breakers.failed("w", now=0.0)
    breakers.failed("w", now=0.0)
    breakers.succeeded("w")
    breakers.failed("w", now=0.0)
    assert breakers.allows("w", now=0.0)
    assert breakers.states() == {"w": BreakerState.CLOSED}


def test_after_the_cool_down_exactly_one_probe_is_let_through() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(3):
        breakers.failed("w", now=0.0)
    assert not breakers.allows("w", now=9.9)
    assert breakers.allows("w", now=10.0)
    breakers.routed("w", now=10.0)
    assert breakers.states() == {"w": BreakerState.HALF_OPEN}
    assert not breakers.allows("w", now=10.0)  # the probe is in flight: nobody else
    breakers.succeeded("w")
    assert breakers.allows("w", now=10.0)
    assert breakers.states() == {}


def test_a_failed_probe_opens_the_breaker_for_another_cool_down() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(3):
        breakers.failed("w", now=0.0)
    breakers.routed("w", now=10.0)
    breakers.failed("w", now=10.0)
    assert not breakers.allows("w", now=19.9)
    assert breakers.allows("w", now=20.0)


def test_an_abandoned_probe_frees_the_probe_slot() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(3):
        breakers.failed("w", now=0.0)
    breakers.routed("w", now=10.0)
    breakers.abandoned("w")
    assert breakers.allows("w", now=10.0)


def test_other_workers_are_not_affected_and_forget_drops_state() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(3):
        breakers.failed("a", now=0.0)
    assert breakers.allows("b", now=0.0)
    breakers.forget("a")
    assert breakers.allows("a", now=0.0)


def test_a_busy_answer_neither_counts_as_a_failure_nor_resets_the_failures() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(10):
        breakers.busy("w")
    assert breakers.allows("w", now=0.0)
    assert breakers.states() == {}

    breakers.failed("w", now=0.0)
    breakers.failed("w", now=0.0)
    breakers.busy("w")  # alive, but no proof that it serves: the two failures still count
    breakers.failed("w", now=0.0)
    assert not breakers.allows("w", now=0.0)


def test_a_probe_answered_busy_frees_the_probe_slot_and_leaves_the_breaker_half_open() -> None:
    breakers = CircuitBreakers(CONFIG)
    for _ in range(3):
        breakers.failed("w", now=0.0)
    breakers.routed("w", now=10.0)
    breakers.busy("w")
    assert breakers.states() == {"w": BreakerState.HALF_OPEN}
    assert breakers.allows("w", now=10.0)  # the next request probes again
