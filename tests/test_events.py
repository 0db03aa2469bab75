"""The pure diff of two snapshots into change events (actors/core/events.py)."""

from __future__ import annotations

from dataclasses import replace

from actors import worker_spec
from actors.core.events import EventKind, diff, matches, status_kind
from actors.core.model import Worker, WorkerStatus, WorkerType
from actors.core.snapshot import RegistrySnapshot
from tests.specs import detection


def worker(n: int, status: WorkerStatus = WorkerStatus.PENDING, **spec: object) -> Worker:
    return Worker(
        id=f"00000000-0000-4000-8000-{n:012d}",
        spec=worker_spec(f"127.0.0.1:{20000 + n}", **spec),
        status=status,
        created_at=1.0,
        updated_at=1.0,
    )


def snap(*workers: Worker) -> RegistrySnapshot:
    return RegistrySnapshot(workers={w.id: w for w in workers})


def kinds(previous: RegistrySnapshot, current: RegistrySnapshot) -> list[tuple[str, str]]:
    return [(change.kind.value, change.worker.id[-2:]) for change in diff(previous, current)]


def ready(w: Worker, *models: str) -> Worker:
    return replace(
        w, status=WorkerStatus.READY, is_healthy=True, detection=detection(w.spec.url, *models)
    )


def test_identical_snapshots_give_no_events() -> None:
    a = snap(worker(1), worker(2))
    assert diff(a, a) == []
    assert diff(a, snap(*a.workers.values())) == []  # same records, new mapping


def test_each_status_change_has_its_kind_and_other_changes_are_updates() -> None:
    w = worker(1)
    up = ready(w, "m")
    assert kinds(snap(), snap(w)) == [("created", "01")]
    assert kinds(snap(w), snap(up)) == [("ready", "01")]
    assert kinds(snap(up), snap(replace(up, is_healthy=False))) == [("updated", "01")]
    assert kinds(snap(up), snap(replace(up, spec_version=2))) == [("updated", "01")]
    draining = replace(up, status=WorkerStatus.DRAINING)
    assert kinds(snap(up), snap(draining)) == [("draining", "01")]
    failed = replace(w, status=WorkerStatus.FAILED)
    assert kinds(snap(w), snap(failed)) == [("failed", "01")]
    assert kinds(snap(failed), snap(w)) == [("updated", "01")]  # a retry: back to pending
    assert kinds(snap(draining), snap()) == [("removed", "01")]


def test_a_worker_created_and_ready_in_one_batch_is_one_created_event_with_its_record() -> None:
    up = ready(worker(1), "m")
    [change] = diff(snap(), snap(up))
    assert (change.kind, change.worker.status) == (EventKind.CREATED, WorkerStatus.READY)


def test_removals_come_first_then_the_rest_in_registration_order() -> None:
    a, b, c, d = worker(1), worker(2), worker(3), worker(4)
    before = snap(a, b, c)
    after = snap(replace(a, spec_version=2), c, d, replace(b, spec_version=3))
    assert kinds(before, snap(replace(a, spec_version=2), c, d)) == [
        ("removed", "02"),
        ("updated", "01"),
        ("created", "04"),
    ]
    assert kinds(before, after) == [("updated", "01"), ("created", "04"), ("updated", "02")]


def test_a_removed_event_carries_the_last_record() -> None:
    w = ready(worker(1), "m")
    [change] = diff(snap(w), snap())
    assert change.worker is w
    assert change.before is w


def test_known_changed_ids_limit_the_comparison_in_the_given_order() -> None:
    a, b, c = worker(1), worker(2), worker(3)
    before = snap(a, b, c)
    after = snap(replace(a, spec_version=2), replace(b, spec_version=2))
    changes = diff(before, after, changed=[b.id, c.id])
    assert [(ch.kind, ch.worker.id) for ch in changes] == [
        (EventKind.REMOVED, c.id),
        (EventKind.UPDATED, b.id),
    ]


def test_status_kinds_and_filters() -> None:
    w = worker(1, worker_type="prefill")
    assert status_kind(w) is EventKind.CREATED
    assert status_kind(ready(w, "m")) is EventKind.READY
    assert matches(ready(w, "m"), "m", None)
    assert not matches(w, "m", None)
    assert matches(worker(2, model_id="m"), "m", None)
    assert matches(w, None, WorkerType.PREFILL)
    assert not matches(w, None, WorkerType.DECODE)
