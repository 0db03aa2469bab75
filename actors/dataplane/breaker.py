"""CircuitBreakers: take a worker whose proxied requests keep failing out of routing (pure).

Per worker: CLOSED (routed) → after ``failure_threshold`` consecutive failures, OPEN (not routed)
→ after ``cooldown_secs``, HALF_OPEN: exactly one request is let through as a probe; its success
closes the breaker, its failure opens it again for another cool-down. State is owned by the data
plane and changed synchronously; the clock is passed in.

Busy is not broken: a worker answering 429 or 503 is overloaded, not failing, and ``busy`` records
no verdict at all. The count of consecutive failures is neither raised (a fleet under a load peak
would otherwise lose its workers one breaker at a time, making the peak worse) nor reset (a
worker that fails every real request while answering some 503s is still failing); a half-open
probe that was answered busy frees the probe slot, and the next request probes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from actors.core.model import WorkerId


class BreakerState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(slots=True)
class _Breaker:
    failures: int = 0
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    probing: bool = False  # a half-open probe is in flight


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    failure_threshold: int = 5
    cooldown_secs: float = 10.0


class CircuitBreakers:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._breakers: dict[WorkerId, _Breaker] = {}

    def allows(self, worker_id: WorkerId, now: float) -> bool:
        """May a request be routed to this worker now? (No state change.)"""
        breaker = self._breakers.get(worker_id)
        if breaker is None or breaker.state is BreakerState.CLOSED:
            return True
        if breaker.state is BreakerState.OPEN:
            return now - breaker.opened_at >= self.config.cooldown_secs
        return not breaker.probing

    def routed(self, worker_id: WorkerId, now: float) -> None:
        """A request was sent to this worker: a cooled-down breaker lets it through as a probe."""
        breaker = self._breakers.get(worker_id)
        if breaker is None or breaker.state is BreakerState.CLOSED:
            return
        if (
            breaker.state is BreakerState.OPEN
            and now - breaker.opened_at >= self.config.cooldown_secs
        ):
            breaker.state = BreakerState.HALF_OPEN
        if breaker.state is BreakerState.HALF_OPEN:
            breaker.probing = True

    def succeeded(self, worker_id: WorkerId) -> None:
        self._breakers.pop(worker_id, None)

    def failed(self, worker_id: WorkerId, now: float) -> None:
        breaker = self._breakers.setdefault(worker_id, _Breaker())
        breaker.failures += 1
        breaker.probing = False
        if breaker.state is BreakerState.HALF_OPEN or (
            breaker.failures >= self.config.failure_threshold
        ):
            breaker.state = BreakerState.OPEN
            breaker.opened_at = now

    def busy(self, worker_id: WorkerId) -> None:
        """The worker answered busy (429/503): no verdict (see the module docstring)."""
        breaker = self._breakers.get(worker_id)
        if breaker is not None:
            breaker.probing = False

    def abandoned(self, worker_id: WorkerId) -> None:
        """A routed request ended without a verdict (cancelled): free the probe slot."""
        breaker = self._breakers.get(worker_id)
        if breaker is not None:
            breaker.probing = False

    def forget(self, worker_id: WorkerId) -> None:
        self._breakers.pop(worker_id, None)

    def states(self) -> dict[WorkerId, int]:
        """Every worker with a breaker that is not plainly closed, and its state."""
        return {worker_id: int(b.state) for worker_id, b in self._breakers.items()}
