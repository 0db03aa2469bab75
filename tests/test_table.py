"""WorkerTable: every registry rule, driven with plain sync calls (DESIGN.md section 6)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

import pytest

from actors import worker_spec as spec
from actors.core.commands import (
    BeginDrain,
    CancelJob,
    Command,
    CreateWorker,
    FinishDrain,
    MarkFailed,
    MarkReady,
    RecheckWorker,
    ReplaceSpec,
    RetryWorker,
    SetHealth,
    StartAttempt,
    StartJob,
    TakeOverJob,
    UpdateSpec,
)
from actors.core.errors import (
    GatewayError,
    PreconditionFailed,
    RegistryBusy,
    StaleJob,
    UrlMismatch,
    WorkerAlreadyExists,
    WorkerDraining,
    WorkerNotFailed,
    WorkerNotFound,
)
from actors.core.model import (
    ConnectionMode,
    JobState,
    JobType,
    Worker,
    WorkerPatch,
    WorkerSpec,
    WorkerStatus,
    WorkerType,
)
from actors.core.table import WorkerTable
from tests.specs import UUID, detection, table_state

E = TypeVar("E", bound=GatewayError)


# ---- helpers ---------------------------------------------------------------------------------


def run(table: WorkerTable, command: Command, *, job_slots: int | None = None) -> Worker:
    return table.apply(command, now=10.0, job_slots=job_slots)


def mark_ready(worker_id: str, job_id: int, url: str, *models: str) -> MarkReady:
    """The result of a job whose detection found ``url`` serving ``models``."""
    return MarkReady(worker_id=worker_id, job_id=job_id, detection=detection(url, *models))


def job_result(result: str, worker_id: str, job_id: int) -> Command:
    """A job's report on ``a:1``: ``ready`` (serving ``m``), ``failed`` or a new ``attempt``."""
    if result == "ready":
        return mark_ready(worker_id, job_id, "a:1", "m")
    if result == "failed":
        return MarkFailed(worker_id=worker_id, job_id=job_id, reason="x")
    return StartAttempt(worker_id=worker_id, job_id=job_id, attempt=1)


def only_start(table: WorkerTable) -> StartJob:
    [effect] = table.take_effects()
    assert isinstance(effect, StartJob)
    return effect


def put(table: WorkerTable, worker: Worker, new_spec: WorkerSpec) -> StartJob:
    """PUT ``new_spec`` over a live worker: the job that re-detects it."""
    run(table, ReplaceSpec(worker_id=worker.id, spec=new_spec))
    return only_start(table)


def add(table: WorkerTable, url: str, **fields: Any) -> tuple[Worker, StartJob]:
    worker = table.apply(CreateWorker(spec=spec(url, **fields)), now=1.0)
    return worker, only_start(table)


def add_ready(table: WorkerTable, url: str, *models: str, **fields: Any) -> Worker:
    worker, job = add(table, url, **fields)
    ready = run(table, mark_ready(worker.id, job.job_id, url, *models))
    assert table.take_effects() == []
    return ready


def add_failed(table: WorkerTable, url: str) -> Worker:
    worker, job = add(table, url)
    failed = run(table, MarkFailed(worker_id=worker.id, job_id=job.job_id, reason="refused"))
    assert table.take_effects() == []
    return failed


def add_failed_rechecking(table: WorkerTable, url: str) -> tuple[Worker, StartJob]:
    """A failed worker and the job of the recheck just started on it."""
    failed = add_failed(table, url)
    assert failed.job is not None
    run(table, RecheckWorker(worker_id=failed.id, job_id=failed.job.job_id))
    return failed, only_start(table)


def refuse(
    table: WorkerTable, command: Command, error: type[E], *, job_slots: int | None = None
) -> E:
    """Apply a command that must be refused with ``error`` and must change nothing."""
    assert table.take_effects() == []
    before = table_state(table)
    with pytest.raises(error) as caught:
        run(table, command, job_slots=job_slots)
    assert table_state(table) == before
    assert table.take_effects() == []
    return caught.value


def models_index(table: WorkerTable) -> dict[str, set[str]]:
    return {model: set(ids) for model, ids in table.indexes.model_index().items()}


# ---- create ----------------------------------------------------------------------------------


def test_create_gives_a_pending_worker_with_a_queued_add_job_and_a_start_job_effect() -> None:
    table = WorkerTable()
    requested = spec("http://a:1", priority=7)

    worker = table.apply(CreateWorker(spec=requested), now=5.0)

    assert UUID.match(worker.id)
    assert worker.status is WorkerStatus.PENDING
    assert worker.spec == requested
    assert worker.spec_version == 1
    assert not worker.is_healthy
    assert (worker.created_at, worker.updated_at) == (5.0, 5.0)
    assert worker.job is not None
    assert (worker.job.job_type, worker.job.state) == (JobType.ADD, JobState.QUEUED)
    assert table.take_effects() == [
        StartJob(
            worker_id=worker.id, job_id=worker.job.job_id, job_type=JobType.ADD, spec=requested
        )
    ]
    assert table.get(worker.id) == worker
    assert table.snapshot().get(worker.id) == worker
    assert table.indexes.key_index() == {"a:1": worker.id}
    assert table.indexes.model_index() == {}


@pytest.mark.parametrize("second", ["HTTP://A:1/", "http://a:1", "a:1", "grpc://a:1", "A:1"])
def test_a_second_create_with_another_spelling_of_the_same_address_is_a_409_with_the_existing_id(
    second: str,
) -> None:
    table = WorkerTable()
    first, _ = add(table, "http://a:1")

    error = refuse(table, CreateWorker(spec=spec(second)), WorkerAlreadyExists)

    assert error.status == 409
    assert error.code == "WORKER_ALREADY_EXISTS"
    assert error.worker_id == first.id
    assert error.context["worker_id"] == first.id
    assert first.id in error.message
    assert len(table) == 1


def test_create_of_an_address_held_by_a_ready_or_failed_worker_is_a_409() -> None:
    table = WorkerTable()
    ready = add_ready(table, "a:1", "m")
    failed = add_failed(table, "b:2")

    assert refuse(table, CreateWorker(spec=spec("http://a:1")), WorkerAlreadyExists).worker_id == (
        ready.id
    )
    assert refuse(table, CreateWorker(spec=spec("grpc://b:2")), WorkerAlreadyExists).worker_id == (
        failed.id
    )


def test_create_with_no_free_job_slot_is_a_503_and_leaves_nothing_behind() -> None:
    table = WorkerTable()

    error = refuse(table, CreateWorker(spec=spec("a:1")), RegistryBusy, job_slots=0)

    assert error.status == 503
    assert error.code == "REGISTRY_BUSY"
    assert len(table) == 0
    assert table.snapshot().workers == {}
    assert table.indexes.key_index() == {}
    worker = run(table, CreateWorker(spec=spec("a:1")), job_slots=1)  # the address is still free
    assert worker.status is WorkerStatus.PENDING


def test_worker_ids_are_lowercase_hyphenated_uuids_and_distinct() -> None:
    table = WorkerTable()

    ids = [add(table, f"h{n}:1")[0].id for n in range(20)]

    assert all(UUID.match(worker_id) for worker_id in ids)
    assert len(set(ids)) == 20


def test_ids_are_never_reused_across_1000_create_and_remove_cycles() -> None:
    table = WorkerTable()
    seen: set[str] = set()

    for cycle in range(1000):
        worker, job = add(table, "a:1")
        assert worker.id not in seen
        seen.add(worker.id)
        if cycle % 2:  # half go through ready -> draining -> gone, half are removed pending
            ready = mark_ready(worker.id, job.job_id, "a:1")
            run(table, ready)
            run(table, BeginDrain(worker_id=worker.id))
            run(table, FinishDrain(worker_id=worker.id))
        else:
            run(table, BeginDrain(worker_id=worker.id))
        table.take_effects()
        assert table.get(worker.id) is None

    assert len(seen) == 1000
    assert len(table) == 0
    assert table.indexes.key_index() == {}


def test_a_table_never_hands_out_a_live_id_twice_even_if_the_id_source_repeats() -> None:
    source = iter(["id-1", "id-1", "id-1", "id-2"])
    table = WorkerTable(new_id=lambda: next(source))

    first, _ = add(table, "a:1")
    second, _ = add(table, "b:2")

    assert (first.id, second.id) == ("id-1", "id-2")


# ---- job results -----------------------------------------------------------------------------


def test_start_attempt_marks_the_job_running_with_its_attempt_and_message() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")

    running = table.apply(
        StartAttempt(worker_id=worker.id, job_id=job.job_id, attempt=3, message="refused"), now=4.0
    )

    assert running.status is WorkerStatus.PENDING
    assert running.job is not None
    assert (running.job.state, running.job.attempts, running.job.message) == (
        JobState.RUNNING,
        3,
        "refused",
    )
    assert running.job.updated_at == 4.0


def test_mark_ready_puts_the_workers_models_in_the_model_index_and_the_snapshot() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")
    other = add_ready(table, "b:2", "m2")

    ready = table.apply(
        mark_ready(worker.id, job.job_id, "a:1", "m1", "m2"),
        now=3.0,
    )

    assert ready.id == worker.id
    assert ready.status is WorkerStatus.READY
    assert ready.is_healthy
    assert ready.is_routable
    assert ready.model_ids == {"m1", "m2"}
    assert ready.job is not None and ready.job.state is JobState.SUCCEEDED
    assert models_index(table) == {"m1": {worker.id}, "m2": {worker.id, other.id}}
    snapshot = table.snapshot()
    assert {model: set(ids) for model, ids in snapshot.by_model.items()} == models_index(table)
    assert [w.id for w in snapshot.ready_for_model("m1")] == [worker.id]
    assert {w.id for w in snapshot.ready_for_model("m2")} == {worker.id, other.id}
    assert snapshot.ready_for_model("absent") == []


def test_a_bare_address_shows_the_scheme_detection_chose_and_keeps_its_key() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")
    assert worker.url.text == "a:1"
    assert worker.connection_mode is None
    assert table.indexes.mode_index() == {}

    ready = run(
        table,
        MarkReady(
            worker_id=worker.id,
            job_id=job.job_id,
            detection=detection("a:1", "m", mode=ConnectionMode.GRPC),
        ),
    )

    assert ready.url.text == "grpc://a:1"
    assert ready.key == "a:1"
    assert table.indexes.key_index() == {"a:1": worker.id}
    assert table.indexes.mode_index() == {ConnectionMode.GRPC: frozenset({worker.id})}


def test_mark_failed_makes_a_pending_worker_failed_with_the_reason_and_no_models() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")

    failed = run(table, MarkFailed(worker_id=worker.id, job_id=job.job_id, reason="timed out"))

    assert failed.status is WorkerStatus.FAILED
    assert not failed.is_routable
    assert failed.job is not None
    assert (failed.job.state, failed.job.message) == (JobState.FAILED, "timed out")
    assert table.indexes.key_index() == {"a:1": worker.id}
    assert table.indexes.model_index() == {}


@pytest.mark.parametrize("result", ["ready", "failed", "attempt"])
def test_a_job_result_with_a_stale_job_id_is_refused_and_changes_nothing(result: str) -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")
    stale = job.job_id + 1000
    command = job_result(result, worker.id, stale)

    error = refuse(table, command, StaleJob)

    assert error.context["worker_id"] == worker.id
    assert table.get(worker.id) == worker


def test_a_second_result_for_a_finished_job_is_stale() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")
    run(table, mark_ready(worker.id, job.job_id, "a:1", "m"))

    refuse(table, MarkFailed(worker_id=worker.id, job_id=job.job_id, reason="late"), StaleJob)
    refuse(table, mark_ready(worker.id, job.job_id, "a:1", "n"), StaleJob)


def test_a_detection_of_another_address_is_refused() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")

    error = refuse(table, mark_ready(worker.id, job.job_id, "b:2", "m"), StaleJob)

    assert "b:2" in error.message


# ---- PUT -------------------------------------------------------------------------------------


def test_a_put_of_a_ready_worker_keeps_the_old_spec_serving_until_its_detection_succeeds() -> None:
    table = WorkerTable()
    old = add_ready(table, "http://a:1", "old", "both", priority=10)
    new_spec = spec("http://a:1", priority=90)

    pending_put = run(table, ReplaceSpec(worker_id=old.id, spec=new_spec))

    start = only_start(table)
    assert start == StartJob(
        worker_id=old.id, job_id=start.job_id, job_type=JobType.REPLACE, spec=new_spec
    )
    assert pending_put.status is WorkerStatus.READY
    assert pending_put.spec == old.spec
    assert pending_put.spec_version == 1
    assert pending_put.model_ids == {"old", "both"}
    assert pending_put.job is not None
    assert (pending_put.job.job_type, pending_put.job.state) == (JobType.REPLACE, JobState.QUEUED)
    assert models_index(table) == {"old": {old.id}, "both": {old.id}}
    assert table.indexes.key_index() == {"a:1": old.id}


def test_a_put_swaps_spec_and_models_in_place_when_its_detection_succeeds() -> None:
    table = WorkerTable()
    old = add_ready(table, "http://a:1", "old", "both", priority=10)
    new_spec = spec("HTTP://A:1/", priority=90, worker_type=WorkerType.PREFILL)
    observed_keys: list[dict[str, str]] = []

    job = put(table, old, new_spec)
    observed_keys.append(table.indexes.key_index())
    run(table, StartAttempt(worker_id=old.id, job_id=job.job_id, attempt=1))
    observed_keys.append(table.indexes.key_index())
    swapped = run(table, mark_ready(old.id, job.job_id, "a:1", "both", "new"))
    observed_keys.append(table.indexes.key_index())

    assert swapped.id == old.id
    assert swapped.status is WorkerStatus.READY
    assert swapped.spec == new_spec
    assert swapped.spec_version == 2
    assert swapped.model_ids == {"both", "new"}
    assert swapped.job is not None
    assert (swapped.job.job_type, swapped.job.state) == (JobType.REPLACE, JobState.SUCCEEDED)
    assert models_index(table) == {"both": {old.id}, "new": {old.id}}
    assert table.indexes.type_index() == {WorkerType.PREFILL: frozenset({old.id})}
    assert observed_keys == [{"a:1": old.id}] * 3
    assert table.snapshot().get(old.id) == swapped
    assert len(table) == 1


def test_a_failed_put_leaves_the_old_spec_serving_and_says_failed() -> None:
    table = WorkerTable()
    old = add_ready(table, "a:1", "m", priority=10)
    job = put(table, old, spec("a:1", priority=90))

    after = run(table, MarkFailed(worker_id=old.id, job_id=job.job_id, reason="no models"))

    assert after.status is WorkerStatus.READY
    assert after.spec == old.spec
    assert after.spec_version == 1
    assert after.model_ids == {"m"}
    assert after.is_routable
    assert after.job is not None
    assert (after.job.job_type, after.job.state, after.job.message) == (
        JobType.REPLACE,
        JobState.FAILED,
        "no models",
    )
    assert models_index(table) == {"m": {old.id}}


def test_a_patch_during_a_put_cancels_the_put_and_its_late_result_is_stale() -> None:
    table = WorkerTable()
    old = add_ready(table, "a:1", "m", priority=10)
    put_job = put(table, old, spec("a:1", priority=90, model_id="x"))

    patched = run(table, UpdateSpec(worker_id=old.id, patch=WorkerPatch(priority=20)))

    assert table.take_effects() == [CancelJob(worker_id=old.id, job_id=put_job.job_id)]
    assert patched.spec == spec("a:1", priority=20)
    assert patched.spec_version == 2
    assert patched.job is not None
    assert patched.job.job_id == put_job.job_id
    assert patched.job.state is JobState.CANCELLED
    assert patched.job.message is not None and "PATCH" in patched.job.message
    refuse(table, mark_ready(old.id, put_job.job_id, "a:1", "x"), StaleJob)
    assert table.get(old.id) == patched
    assert models_index(table) == {"m": {old.id}}


def test_a_put_superseded_by_a_later_put_cannot_swap_its_spec_in() -> None:
    table = WorkerTable()
    old = add_ready(table, "a:1", "m")
    first = put(table, old, spec("a:1", priority=1))
    run(table, ReplaceSpec(worker_id=old.id, spec=spec("a:1", priority=2)))
    effects = table.take_effects()
    [second] = [effect for effect in effects if isinstance(effect, StartJob)]
    assert CancelJob(worker_id=old.id, job_id=first.job_id) in effects

    refuse(table, mark_ready(old.id, first.job_id, "a:1", "m1"), StaleJob)
    swapped = run(table, mark_ready(old.id, second.job_id, "a:1", "m2"))

    assert swapped.spec.priority == 2
    assert swapped.spec_version == 2
    assert models_index(table) == {"m2": {old.id}}


def test_a_delete_during_a_put_cancels_the_put_and_its_late_result_cannot_revive_it() -> None:
    table = WorkerTable()
    old = add_ready(table, "a:1", "m")
    put_job = put(table, old, spec("a:1", priority=1))

    draining = run(table, BeginDrain(worker_id=old.id))

    assert CancelJob(worker_id=old.id, job_id=put_job.job_id) in table.take_effects()
    refuse(table, mark_ready(old.id, put_job.job_id, "a:1", "m"), StaleJob)
    assert table.get(old.id) == draining
    assert draining.status is WorkerStatus.DRAINING


def test_a_put_of_a_pending_worker_restarts_its_registration_with_the_new_spec() -> None:
    table = WorkerTable()
    worker, add_job = add(table, "a:1", priority=10)
    new_spec = spec("grpc://a:1", priority=90)

    replaced = run(table, ReplaceSpec(worker_id=worker.id, spec=new_spec))

    effects = table.take_effects()
    assert effects[0] == CancelJob(worker_id=worker.id, job_id=add_job.job_id)
    assert isinstance(effects[1], StartJob)
    assert (effects[1].job_type, effects[1].spec) == (JobType.ADD, new_spec)
    assert len(effects) == 2
    assert replaced.id == worker.id
    assert replaced.status is WorkerStatus.PENDING
    assert replaced.spec == new_spec
    assert replaced.spec_version == 2
    assert replaced.job is not None and replaced.job.job_id == effects[1].job_id
    refuse(table, mark_ready(worker.id, add_job.job_id, "a:1", "m"), StaleJob)
    assert table.indexes.mode_index() == {ConnectionMode.GRPC: frozenset({worker.id})}


def test_a_put_of_a_failed_worker_registers_it_again_under_the_same_id() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")

    replaced = run(table, ReplaceSpec(worker_id=failed.id, spec=spec("a:1", priority=3)))

    start = only_start(table)
    assert (start.worker_id, start.job_type) == (failed.id, JobType.ADD)
    assert replaced.status is WorkerStatus.PENDING
    assert replaced.spec.priority == 3
    assert replaced.job is not None and replaced.job.active


def test_a_put_naming_a_different_address_is_a_url_mismatch() -> None:
    table = WorkerTable()
    worker = add_ready(table, "http://a:1", "m")

    error = refuse(table, ReplaceSpec(worker_id=worker.id, spec=spec("http://a:2")), UrlMismatch)

    assert error.status == 400
    assert error.code == "URL_MISMATCH"
    assert "http://a:1" in error.message
    assert "http://a:2" in error.message


def test_a_put_of_a_draining_worker_is_a_409() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    run(table, BeginDrain(worker_id=worker.id))
    table.take_effects()

    error = refuse(table, ReplaceSpec(worker_id=worker.id, spec=spec("a:1")), WorkerDraining)

    assert (error.status, error.code) == (409, "WORKER_DRAINING")


def test_a_put_with_no_free_job_slot_is_a_503_and_the_old_spec_keeps_serving() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")

    refuse(
        table,
        ReplaceSpec(worker_id=worker.id, spec=spec("a:1", priority=1)),
        RegistryBusy,
        job_slots=0,
    )

    assert table.get(worker.id) == worker


# ---- If-Match and PATCH ----------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["PUT", "PATCH"])
def test_an_if_match_that_is_not_the_spec_version_is_a_412(verb: str) -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    command: Command
    if verb == "PUT":
        command = ReplaceSpec(worker_id=worker.id, spec=spec("a:1", priority=1), if_match=2)
    else:
        command = UpdateSpec(worker_id=worker.id, patch=WorkerPatch(priority=1), if_match=2)

    error = refuse(table, command, PreconditionFailed)

    assert (error.status, error.code) == (412, "PRECONDITION_FAILED")
    assert error.context["spec_version"] == 1


@pytest.mark.parametrize("verb", ["PUT", "PATCH"])
def test_an_if_match_equal_to_the_spec_version_is_accepted(verb: str) -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    run(table, UpdateSpec(worker_id=worker.id, patch=WorkerPatch(cost=2.0)))  # version 2
    command: Command
    if verb == "PUT":
        command = ReplaceSpec(worker_id=worker.id, spec=spec("a:1", priority=1), if_match=2)
    else:
        command = UpdateSpec(worker_id=worker.id, patch=WorkerPatch(priority=1), if_match=2)

    accepted = run(table, command)

    assert accepted.id == worker.id
    assert accepted.job is not None
    if verb == "PUT":  # the version moves when the new spec is swapped in, not before
        assert (accepted.spec_version, accepted.job.job_type) == (2, JobType.REPLACE)
    else:
        assert (accepted.spec_version, accepted.spec.priority) == (3, 1)


def test_a_patch_merges_labels_removes_a_label_set_to_none_and_bumps_spec_version() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m", labels={"zone": "a", "tier": "gold", "keep": "1"})

    patched = table.apply(
        UpdateSpec(
            worker_id=worker.id,
            patch=WorkerPatch(labels={"zone": "b", "tier": None, "new": "x", "absent": None}),
        ),
        now=7.0,
    )

    assert patched.spec.labels == {"zone": "b", "keep": "1", "new": "x"}
    assert patched.labels == {"zone": "b", "keep": "1", "new": "x"}
    assert patched.spec_version == 2
    assert patched.updated_at == 7.0
    assert table.get(worker.id) == patched
    assert table.snapshot().get(worker.id) == patched
    assert table.take_effects() == []
    assert models_index(table) == {"m": {worker.id}}


def test_a_patch_changes_only_the_fields_it_names() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m", priority=10, cost=3.0, api_key="k1")

    patched = run(
        table,
        UpdateSpec(
            worker_id=worker.id,
            patch=WorkerPatch(cost=0.5, health={"timeout_secs": 1.5}),
        ),
    )

    assert patched.spec.priority == 10
    assert patched.spec.cost == 0.5
    assert patched.spec.api_key == "k1"
    assert patched.spec.health.timeout_secs == 1.5
    assert patched.spec.health.check_interval_secs == worker.spec.health.check_interval_secs


def test_a_patch_of_a_pending_worker_applies_at_once_and_keeps_its_registration_running() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")

    patched = run(table, UpdateSpec(worker_id=worker.id, patch=WorkerPatch(priority=99)))

    assert table.take_effects() == []
    assert patched.status is WorkerStatus.PENDING
    assert patched.spec.priority == 99
    assert patched.job == worker.job
    ready = run(table, mark_ready(worker.id, job.job_id, "a:1", "m"))
    assert ready.spec.priority == 99
    assert ready.spec_version == 2


# ---- DELETE (begin_drain / finish_drain) -----------------------------------------------------


def test_delete_of_a_pending_worker_removes_it_at_once_and_cancels_its_registration() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")

    run(table, BeginDrain(worker_id=worker.id))

    effects = table.take_effects()
    assert effects
    assert all(isinstance(effect, CancelJob) for effect in effects)
    assert {effect.worker_id for effect in effects} == {worker.id}
    assert table.get(worker.id) is None
    assert table.snapshot().get(worker.id) is None
    assert table.indexes.key_index() == {}
    assert table.indexes.type_index() == {}
    refuse(table, mark_ready(worker.id, job.job_id, "a:1", "m"), WorkerNotFound)
    assert run(table, CreateWorker(spec=spec("a:1"))).id != worker.id  # the address is free


def test_delete_of_a_failed_worker_removes_it_at_once() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")

    run(table, BeginDrain(worker_id=failed.id))

    assert table.get(failed.id) is None
    assert table.indexes.key_index() == {}
    assert CancelJob(worker_id=failed.id, job_id=None) in table.take_effects()


def test_delete_of_a_ready_worker_stops_routing_but_keeps_the_address_until_finish_drain() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    other = add_ready(table, "b:2", "m")

    draining = run(table, BeginDrain(worker_id=worker.id))

    assert draining.status is WorkerStatus.DRAINING
    assert not draining.is_routable
    assert draining.job is not None
    assert (draining.job.job_type, draining.job.state) == (JobType.REMOVE, JobState.RUNNING)
    assert models_index(table) == {"m": {other.id}}
    assert [w.id for w in table.snapshot().ready_for_model("m")] == [other.id]
    assert table.indexes.key_index()["a:1"] == worker.id
    assert table.get(worker.id) == draining
    assert not [e for e in table.take_effects() if isinstance(e, StartJob)]
    error = refuse(table, CreateWorker(spec=spec("http://a:1")), WorkerAlreadyExists)
    assert error.worker_id == worker.id

    gone = run(table, FinishDrain(worker_id=worker.id))

    assert gone.id == worker.id
    assert table.get(worker.id) is None
    assert table.indexes.key_index() == {"b:2": other.id}
    assert run(table, CreateWorker(spec=spec("a:1"))).id not in (worker.id, other.id)


def test_a_second_delete_of_a_draining_worker_is_accepted_and_changes_nothing() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    first = run(table, BeginDrain(worker_id=worker.id))
    table.take_effects()
    before = table_state(table)

    second = run(table, BeginDrain(worker_id=worker.id))

    assert second == first
    assert table_state(table) == before
    assert table.take_effects() == []


@pytest.mark.parametrize("result", ["ready", "failed", "attempt"])
def test_a_job_result_naming_the_remove_job_of_a_draining_worker_is_stale(result: str) -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    draining = run(table, BeginDrain(worker_id=worker.id))
    table.take_effects()
    assert draining.job is not None
    remove_job = draining.job.job_id
    command = job_result(result, worker.id, remove_job)

    refuse(table, command, StaleJob)


@pytest.mark.parametrize("status", ["pending", "ready", "failed"])
def test_finish_drain_of_a_worker_that_is_not_draining_is_refused(status: str) -> None:
    table = WorkerTable()
    if status == "pending":
        worker, _ = add(table, "a:1")
    elif status == "ready":
        worker = add_ready(table, "a:1", "m")
    else:
        worker = add_failed(table, "a:1")

    refuse(table, FinishDrain(worker_id=worker.id), StaleJob)


def test_set_health_of_a_draining_worker_is_recorded_but_it_stays_unrouted() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    run(table, BeginDrain(worker_id=worker.id))

    after = run(table, SetHealth(worker_id=worker.id, healthy=False))

    assert after.status is WorkerStatus.DRAINING
    assert not after.is_healthy
    assert table.indexes.model_index() == {}


# ---- retry and recheck -----------------------------------------------------------------------


@pytest.mark.parametrize("status", ["pending", "ready", "draining"])
def test_retry_of_a_worker_that_is_not_failed_is_a_409(status: str) -> None:
    table = WorkerTable()
    if status == "pending":
        worker, _ = add(table, "a:1")
    else:
        worker = add_ready(table, "a:1", "m")
        if status == "draining":
            run(table, BeginDrain(worker_id=worker.id))
            table.take_effects()

    error = refuse(table, RetryWorker(worker_id=worker.id), WorkerNotFailed)

    assert (error.status, error.code) == (409, "WORKER_NOT_FAILED")
    assert status in error.message


def test_retry_of_a_failed_worker_restarts_its_registration_under_the_same_id() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")

    retried = run(table, RetryWorker(worker_id=failed.id))

    start = only_start(table)
    assert (start.worker_id, start.job_type, start.spec) == (failed.id, JobType.RETRY, failed.spec)
    assert retried.status is WorkerStatus.PENDING
    assert retried.job is not None
    assert (retried.job.job_id, retried.job.state) == (start.job_id, JobState.QUEUED)
    ready = run(table, mark_ready(failed.id, start.job_id, "a:1", "m"))
    assert ready.status is WorkerStatus.READY
    assert models_index(table) == {"m": {failed.id}}


def test_retry_with_no_free_job_slot_is_a_503_and_the_worker_stays_failed() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")

    refuse(table, RetryWorker(worker_id=failed.id), RegistryBusy, job_slots=0)

    assert table.get(failed.id) == failed


def test_recheck_of_a_failed_worker_starts_a_recheck_keeping_the_failure_message() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")
    assert failed.job is not None

    rechecking = run(table, RecheckWorker(worker_id=failed.id, job_id=failed.job.job_id))

    start = only_start(table)
    assert (start.worker_id, start.job_type) == (failed.id, JobType.RECHECK)
    assert rechecking.status is WorkerStatus.FAILED
    assert rechecking.job is not None
    assert (rechecking.job.job_type, rechecking.job.state, rechecking.job.message) == (
        JobType.RECHECK,
        JobState.QUEUED,
        "refused",
    )


def test_a_recheck_that_succeeds_makes_the_failed_worker_ready_under_the_same_id() -> None:
    table = WorkerTable()
    failed, start = add_failed_rechecking(table, "a:1")

    ready = run(table, mark_ready(failed.id, start.job_id, "a:1", "m"))

    assert ready.id == failed.id
    assert ready.status is WorkerStatus.READY
    assert models_index(table) == {"m": {failed.id}}


def test_a_recheck_that_fails_keeps_the_worker_failed_with_the_new_reason() -> None:
    table = WorkerTable()
    failed, start = add_failed_rechecking(table, "a:1")

    after = run(table, MarkFailed(worker_id=failed.id, job_id=start.job_id, reason="still down"))

    assert after.status is WorkerStatus.FAILED
    assert after.job is not None
    assert (after.job.job_type, after.job.message) == (JobType.RECHECK, "still down")
    run(table, RecheckWorker(worker_id=failed.id, job_id=start.job_id))  # the next recheck
    assert only_start(table).job_type is JobType.RECHECK


def test_a_recheck_with_another_job_id_or_of_a_worker_that_is_not_failed_is_stale() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")
    assert failed.job is not None
    ready = add_ready(table, "b:2", "m")
    assert ready.job is not None

    refuse(table, RecheckWorker(worker_id=failed.id, job_id=failed.job.job_id + 100), StaleJob)
    refuse(table, RecheckWorker(worker_id=ready.id, job_id=ready.job.job_id), StaleJob)
    run(table, RecheckWorker(worker_id=failed.id, job_id=failed.job.job_id))
    table.take_effects()
    # a second recheck while the first is still running is stale too
    refuse(table, RecheckWorker(worker_id=failed.id, job_id=failed.job.job_id), StaleJob)


def test_a_retry_supersedes_a_running_recheck() -> None:
    table = WorkerTable()
    failed, recheck = add_failed_rechecking(table, "a:1")

    run(table, RetryWorker(worker_id=failed.id))

    effects = table.take_effects()
    assert CancelJob(worker_id=failed.id, job_id=recheck.job_id) in effects
    refuse(table, mark_ready(failed.id, recheck.job_id, "a:1", "m"), StaleJob)


def test_a_recheck_with_no_free_job_slot_is_a_503() -> None:
    table = WorkerTable()
    failed = add_failed(table, "a:1")
    assert failed.job is not None

    refuse(
        table,
        RecheckWorker(worker_id=failed.id, job_id=failed.job.job_id),
        RegistryBusy,
        job_slots=0,
    )


# ---- health ----------------------------------------------------------------------------------


def test_set_health_flips_whether_a_ready_worker_is_routable() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")

    sick = run(table, SetHealth(worker_id=worker.id, healthy=False))

    assert sick.status is WorkerStatus.READY
    assert not sick.is_healthy
    assert not sick.is_routable
    assert table.snapshot().get(worker.id) == sick
    healthy = run(table, SetHealth(worker_id=worker.id, healthy=True))
    assert healthy.is_routable


def test_set_health_to_the_current_value_publishes_nothing_new() -> None:
    table = WorkerTable()
    worker = add_ready(table, "a:1", "m")
    before = table_state(table)

    same = run(table, SetHealth(worker_id=worker.id, healthy=True))

    assert same == worker
    assert table_state(table) == before


@pytest.mark.parametrize("status", ["pending", "failed"])
def test_set_health_of_a_worker_that_is_not_serving_is_stale(status: str) -> None:
    table = WorkerTable()
    if status == "pending":
        worker, _ = add(table, "a:1")
    else:
        worker = add_failed(table, "a:1")

    refuse(table, SetHealth(worker_id=worker.id, healthy=True), StaleJob)


# ---- unknown ids and frozen snapshots --------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        StartAttempt(worker_id="nope", job_id=1, attempt=1),
        MarkReady(worker_id="nope", job_id=1, detection=detection("a:1")),
        MarkFailed(worker_id="nope", job_id=1, reason="x"),
        ReplaceSpec(worker_id="nope", spec=spec("a:1")),
        UpdateSpec(worker_id="nope", patch=WorkerPatch(priority=1)),
        BeginDrain(worker_id="nope"),
        FinishDrain(worker_id="nope"),
        RetryWorker(worker_id="nope"),
        RecheckWorker(worker_id="nope", job_id=1),
        SetHealth(worker_id="nope", healthy=True),
    ],
    ids=lambda command: type(command).__name__,
)
def test_a_command_for_an_unknown_worker_is_a_404(command: Command) -> None:
    table = WorkerTable()
    add_ready(table, "a:1", "m")

    error = refuse(table, command, WorkerNotFound)

    assert (error.status, error.code) == (404, "WORKER_NOT_FOUND")
    assert "nope" in error.message


def test_a_snapshot_taken_before_a_command_is_not_changed_by_it() -> None:
    table = WorkerTable()
    worker, job = add(table, "a:1")
    other = add_ready(table, "b:2", "m")
    before = table.snapshot()
    frozen = (before.version, dict(before.workers), dict(before.by_key), dict(before.by_model))

    run(table, mark_ready(worker.id, job.job_id, "a:1", "m"))
    run(table, UpdateSpec(worker_id=worker.id, patch=WorkerPatch(labels={"k": "v"})))
    run(table, BeginDrain(worker_id=other.id))
    run(table, CreateWorker(spec=spec("c:3")))

    assert (before.version, dict(before.workers), dict(before.by_key), dict(before.by_model)) == (
        frozen
    )
    assert before.get(worker.id) == worker
    assert before.get(worker.id) is not None
    assert [w.id for w in before.ready_for_model("m")] == [other.id]
    after = table.snapshot()
    assert after.version > before.version
    assert len(after.workers) == 3
    assert after.workers[worker.id].status is WorkerStatus.READY


def test_the_snapshot_version_grows_with_every_change_and_only_then() -> None:
    table = WorkerTable()
    versions = [table.snapshot().version]
    worker, job = add(table, "a:1")
    versions.append(table.snapshot().version)
    run(table, mark_ready(worker.id, job.job_id, "a:1", "m"))
    versions.append(table.snapshot().version)
    refuse(table, CreateWorker(spec=spec("a:1")), WorkerAlreadyExists)
    versions.append(table.snapshot().version)

    assert versions[0] < versions[1] < versions[2] == versions[3]
    assert table.snapshot() is table.snapshot()  # an unchanged table republishes the same view


def test_snapshot_select_filters_by_model_status_and_type_in_registration_order() -> None:
    table = WorkerTable()
    first = add_ready(table, "a:1", "m1")
    pending, _ = add(table, "b:2", model_id="m1", worker_type=WorkerType.PREFILL)
    third = add_ready(table, "c:3", "m2", worker_type=WorkerType.DECODE)
    snapshot = table.snapshot()

    assert [w.id for w in snapshot.select()] == [first.id, pending.id, third.id]
    assert [w.id for w in snapshot.select(model="m1")] == [first.id, pending.id]
    assert [w.id for w in snapshot.select(status=WorkerStatus.READY)] == [first.id, third.id]
    assert [w.id for w in snapshot.select(worker_type=WorkerType.PREFILL)] == [pending.id]
    assert snapshot.select(model="m2", status=WorkerStatus.PENDING) == []


# ---- another replica's changes (absorb) ------------------------------------------------------


def test_absorbing_another_replicas_change_cancels_the_job_it_ended_or_superseded() -> None:
    ours, theirs = WorkerTable(), WorkerTable()
    created = run(ours, CreateWorker(spec=spec("10.0.0.1:8000")))
    ours.take_effects()
    ours.take_changes()
    assert created.job is not None and created.job.active
    # the other replica's view of the same worker, its job now cancelled (not superseded)
    cancelled = replace(created, job=replace(created.job, state=JobState.CANCELLED))
    effects = ours.absorb({created.id: (cancelled, None)}, (), next_job_id=1)
    assert effects == [CancelJob(worker_id=created.id, job_id=created.job.job_id)]
    assert ours.get(created.id) == cancelled
    assert ours.take_changes().empty  # stored already: nothing to write back
    # removed there: whatever works on it here stops, and the job ids never go back
    effects = theirs.absorb({created.id: (created, None)}, (), next_job_id=7)
    assert effects == [] and theirs.next_job_id == 7
    assert theirs.absorb({}, [created.id], next_job_id=2) == [
        CancelJob(worker_id=created.id, job_id=None)
    ]
    assert theirs.get(created.id) is None and theirs.next_job_id == 7


def test_a_take_over_runs_a_stopped_replicas_job_again_or_its_recheck() -> None:
    table = WorkerTable()
    worker = run(table, CreateWorker(spec=spec("10.0.0.1:8000", recheck_interval_secs=60)))
    table.take_effects()
    assert worker.job is not None
    again = run(table, TakeOverJob(worker_id=worker.id, job_id=worker.job.job_id))
    assert again.job is not None and again.job.job_id != worker.job.job_id
    [start] = table.take_effects()
    assert isinstance(start, StartJob) and start.job_id == again.job.job_id
    with pytest.raises(StaleJob):  # the first run's id is over
        run(table, TakeOverJob(worker_id=worker.id, job_id=worker.job.job_id))
    failed = run(table, MarkFailed(worker_id=worker.id, job_id=again.job.job_id, reason="down"))
    assert failed.job is not None
    rechecked = run(table, TakeOverJob(worker_id=worker.id, job_id=failed.job.job_id))
    assert rechecked.job is not None and rechecked.job.job_type is JobType.RECHECK
