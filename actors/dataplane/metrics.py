"""GatewayMetrics: the Prometheus metrics of one gateway, in a registry of its own.

Counters and histograms are updated where things happen (the proxy, the registrar); gauges that
describe current state (workers by status, in-flight requests, breaker states, the registry
inbox depth) are read from their owners at scrape time, so nothing is kept twice.

Series die with their worker. The gauges by ``worker_id`` come from the owners' current state,
so a removed worker drops out of them by itself. ``tmg_requests_total{model,worker_id,code}`` is
a counter, and so is ``tmg_worker_busy_total{worker_id}`` (answers 429/503: the worker was
overloaded; not counted against its breaker): each label set they ever had is kept here per
worker, and ``forget_worker`` (called when the registry removes the worker) removes them all; a
series for a worker that is no longer registered is never created again. Without that, every
worker that ever served left its series behind (thousands after a few thousand churn cycles).
The kept children also spare the hot path ``labels()``'s lookup: one dict hit per answer.

``process_label``: every series is rendered with ``process="<label>"`` added (one gateway
process among several on one port, ``tmg serve --processes``). The label is added when
scraped, so the hot path is the same with or without it.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.core.model import WorkerId, WorkerStatus
from actors.core.snapshot import RegistrySnapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Gauges(Collector):
    """Gauges computed when scraped."""

    def __init__(self, read: Callable[[], Iterator[GaugeMetricFamily]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._read()


def _state_gauges(
    snapshot: RegistrySnapshot,
    in_flight: Mapping[WorkerId, int],
    breakers: Mapping[WorkerId, int],
    inbox_depth: int,
) -> Iterator[GaugeMetricFamily]:
    workers = snapshot.workers.values()
    by_status = Tally(worker.status.value for worker in workers)
    family = GaugeMetricFamily("tmg_workers", "Registered workers by status", labels=["status"])
    for status in WorkerStatus:
        family.add_metric([status.value], by_status[status.value])
    yield family
    unhealthy = sum(1 for w in workers if w.status is WorkerStatus.READY and not w.is_healthy)
    yield GaugeMetricFamily("tmg_workers_unhealthy", "Ready workers failing health", unhealthy)
    yield _per_worker("tmg_worker_in_flight", "Requests in flight per worker", in_flight)
    yield _per_worker(
        "tmg_circuit_breaker_state",
        "Circuit breaker per worker: 0 closed, 1 open, 2 half-open",
        breakers,
    )
    yield GaugeMetricFamily(
        "tmg_registry_inbox_depth", "Asks waiting for the registry", inbox_depth
    )


def _per_worker(name: str, documentation: str, values: Mapping[WorkerId, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["worker_id"])
    for worker_id, value in values.items():
        family.add_metric([worker_id], value)
    return family


class _Labelled(Collector):
    """Another collector's metrics with ``labels`` added to every sample."""

    def __init__(self, inner: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, **self._labels})
                for sample in metric.samples
            ]
            yield labelled


class GatewayMetrics:
    def __init__(self, process_label: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._rendered: Collector = (
            self.registry
            if process_label is None
            else _Labelled(self.registry, {"process": process_label})
        )
        # (model, worker_id, code) -> its tmg_requests_total child; worker_id -> its keys
        self._requests: dict[tuple[str, WorkerId, int], Counter] = {}
        self._requests_of: dict[WorkerId, list[tuple[str, WorkerId, int]]] = {}
        self._registered: Callable[[WorkerId], bool] = lambda worker_id: True
        self.proxied = Counter(
            "tmg_requests",
            "Proxied inference requests by model, worker and status code",
            ["model", "worker_id", "code"],
            registry=self.registry,
        )
        self._busy: dict[WorkerId, Counter] = {}
        self.busy = Counter(
            "tmg_worker_busy",
            "Busy answers (429 or 503: overloaded, not failing) by worker",
            ["worker_id"],
            registry=self.registry,
        )
        self.duration = self._latency(
            "tmg_request_duration_seconds", "Time from a request's arrival to the end of its answer"
        )
        self.ttfb = self._latency(
            "tmg_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte of its answer",
        )
        self.retries = Counter(
            "tmg_retries", "Requests retried on another worker", ["model"], registry=self.registry
        )
        self.registration_jobs = Counter(
            "tmg_registration_jobs",
            "Registration workflows by outcome",
            ["outcome"],
            registry=self.registry,
        )

    def _latency(self, name: str, documentation: str) -> Histogram:
        """A histogram of seconds by model."""
        return Histogram(
            name, documentation, ["model"], buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def count_request(self, model: str, worker_id: WorkerId, code: int) -> None:
        """One answer (its status ``code``) from ``worker_id`` for ``model``."""
        key = (model, worker_id, code)
        child = self._requests.get(key)
        if child is None:
            if not self._registered(worker_id):
                return  # removed while this request ran: its series are gone for good
            child = self._requests[key] = self.proxied.labels(model, worker_id, str(code))
            self._requests_of.setdefault(worker_id, []).append(key)
        child.inc()

    def count_busy(self, worker_id: WorkerId) -> None:
        """``worker_id`` answered busy (429 or 503)."""
        child = self._busy.get(worker_id)
        if child is None:
            if not self._registered(worker_id):
                return  # removed while this request ran: its series are gone for good
            child = self._busy[worker_id] = self.busy.labels(worker_id)
        child.inc()

    def forget_worker(self, worker_id: WorkerId) -> None:
        """The worker left the registry: remove every series that names it."""
        if self._busy.pop(worker_id, None) is not None:
            self.busy.remove(worker_id)
        for key in self._requests_of.pop(worker_id, ()):
            del self._requests[key]
            model, _, code = key
            self.proxied.remove(model, worker_id, str(code))

    def registration_jobs_outcome(self, outcome: str) -> None:
        self.registration_jobs.labels(outcome).inc()

    def watch(
        self,
        snapshot: Callable[[], RegistrySnapshot],
        in_flight: Callable[[], Mapping[WorkerId, int]],
        breakers: Callable[[], Mapping[WorkerId, int]],
        inbox_depth: Callable[[], int],
    ) -> None:
        """Report the state gauges from their owners at scrape time; only workers in the
        snapshot get new request series."""
        self._registered = lambda worker_id: worker_id in snapshot().workers
        self.registry.register(
            _Gauges(lambda: _state_gauges(snapshot(), in_flight(), breakers(), inbox_depth()))
        )

    def render(self) -> bytes:
        return generate_latest(self._rendered)
