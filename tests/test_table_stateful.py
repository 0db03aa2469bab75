"""WorkerTable under random command sequences: the invariants of DESIGN.md section 6 hold after
every step, every accepted command does what its rule says, and a refused one changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from actors import (
    GatewayError,
    PreconditionFailed,
    RegistryBusy,
    UrlMismatch,
    WorkerAlreadyExists,
    WorkerDraining,
    WorkerNotFailed,
    WorkerNotFound,
    worker_spec,
)
from actors.core import commands
from actors.core.commands import CancelJob, Command, Effect, StartJob
from actors.core.errors import StaleJob
from actors.core.model import (
    ConnectionMode,
    JobState,
    JobType,
    Runtime,
    Worker,
    WorkerPatch,
    WorkerStatus,
    WorkerType,
)
from actors.core.table import WorkerTable
from actors.core.urls import parse_worker_url
from tests import specs
from tests.specs import UUID, table_state

ADDRESSES = [("a", 1), ("b", 2), ("[::1]", 3), ("10.0.0.7", 80)]
SPELLINGS = [
    spelling
    for host, port in ADDRESSES
    for spelling in (
        f"{host}:{port}",
        f"http://{host}:{port}",
        f"grpc://{host}:{port}",
        f"HTTP://{host.upper()}:{port}/",
    )
]
MODELS = ["m1", "m2", "m3"]
SLOTS = st.one_of(st.none(), st.sampled_from([0, 0, 1, 2]))
IF_MATCH = st.sampled_from(["none", "current", "wrong"])


@dataclass
class Outcome:
    worker: Worker | None = None
    error: GatewayError | None = None
    effects: list[Effect] = field(default_factory=list)


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = WorkerTable()
        self.ids_ever: list[str] = []  # every id the table ever handed out, in order
        self.jobs: list[StartJob] = []  # every job an effect started
        self.now = 0.0
        self.last_version = self.table.snapshot().version

    # ---- the one way a command is applied ----------------------------------------------

    def apply(
        self,
        command: Command,
        problems: set[type[GatewayError]],
        *,
        job_slots: int | None = None,
    ) -> Outcome:
        """Apply ``command``: refused exactly when ``problems`` is not empty, with one of them,
        and then nothing changed."""
        assert self.table.take_effects() == []
        before = table_state(self.table)
        self.now += 1.0
        try:
            worker = self.table.apply(command, now=self.now, job_slots=job_slots)
        except GatewayError as error:
            assert type(error) in problems, f"{command} refused with {error!r}; {problems=}"
            assert table_state(self.table) == before, f"refused {command} changed the table"
            assert self.table.take_effects() == [], f"refused {command} left effects"
            return Outcome(error=error)
        assert not problems, f"{command} was accepted despite {problems}"
        effects = self.table.take_effects()
        starts = [effect for effect in effects if isinstance(effect, StartJob)]
        if job_slots is not None:
            assert len(starts) <= job_slots
        assert len(starts) <= 1
        self.jobs.extend(starts)
        return Outcome(worker=worker, effects=effects)

    def pick_id(self, data: st.DataObject, *prefer: WorkerStatus) -> str:
        """Mostly a live worker in one of the ``prefer`` states, sometimes any live worker,
        now and then an id that may be gone."""
        live = list(self.table.workers)
        preferred = [wid for wid, worker in self.table.workers.items() if worker.status in prefer]
        choice = data.draw(st.integers(0, 7), label="which id")
        if preferred and choice >= 3:
            return data.draw(st.sampled_from(preferred), label="worker_id")
        if live and choice >= 1:
            return data.draw(st.sampled_from(live), label="worker_id")
        return data.draw(st.sampled_from(self.ids_ever), label="worker_id")

    def slots(self, data: st.DataObject) -> int | None:
        return data.draw(SLOTS, label="job_slots")

    def if_match(self, data: st.DataObject, worker: Worker | None) -> int | None:
        choice = data.draw(IF_MATCH, label="if_match")
        if choice == "none" or worker is None:
            return None
        return worker.spec_version + (0 if choice == "current" else 1)

    # ---- rules ---------------------------------------------------------------------------

    @rule(
        url=st.sampled_from(SPELLINGS),
        model_id=st.none() | st.sampled_from(MODELS),
        worker_type=st.sampled_from(WorkerType),
        data=st.data(),
    )
    def create(
        self, url: str, model_id: str | None, worker_type: WorkerType, data: st.DataObject
    ) -> None:
        spec = worker_spec(url, model_id=model_id, worker_type=worker_type)
        job_slots = self.slots(data)
        existing = self.table.indexes.key_index().get(spec.url.key)
        problems: set[type[GatewayError]] = set()
        if existing is not None:
            problems.add(WorkerAlreadyExists)
        if job_slots == 0:
            problems.add(RegistryBusy)

        outcome = self.apply(commands.CreateWorker(spec=spec), problems, job_slots=job_slots)

        if isinstance(outcome.error, WorkerAlreadyExists):
            assert outcome.error.worker_id == existing
        if outcome.worker is None:
            return
        worker = outcome.worker
        assert worker.id not in self.ids_ever, f"id {worker.id} was handed out twice"
        assert UUID.match(worker.id)
        self.ids_ever.append(worker.id)
        assert worker.status is WorkerStatus.PENDING
        assert worker.spec == spec
        assert worker.job is not None
        assert outcome.effects == [
            StartJob(worker_id=worker.id, job_id=worker.job.job_id, job_type=JobType.ADD, spec=spec)
        ]

    def pick_job(self, data: st.DataObject) -> StartJob:
        """Mostly a job that is still working on its worker, sometimes any (maybe stale) job."""
        active = [
            job
            for job in self.jobs
            if (worker := self.table.get(job.worker_id)) is not None
            and worker.job is not None
            and worker.job.job_id == job.job_id
            and worker.job.active
        ]
        if active and data.draw(st.integers(0, 4), label="current job?") > 0:
            return data.draw(st.sampled_from(active), label="job")
        return data.draw(st.sampled_from(self.jobs), label="job")

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def job_attempt(self, data: st.DataObject) -> None:
        self.job_result("attempt", frozenset(), ConnectionMode.HTTP, data)

    @precondition(lambda self: bool(self.jobs))
    @rule(
        models=st.frozensets(st.sampled_from(MODELS)),
        mode=st.sampled_from(ConnectionMode),
        data=st.data(),
    )
    def job_ready(self, models: frozenset[str], mode: ConnectionMode, data: st.DataObject) -> None:
        self.job_result("ready", models, mode, data)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def job_failed(self, data: st.DataObject) -> None:
        self.job_result("failed", frozenset(), ConnectionMode.HTTP, data)

    def job_result(
        self, result: str, models: frozenset[str], mode: ConnectionMode, data: st.DataObject
    ) -> None:
        job = self.pick_job(data)
        url = job.spec.url
        if data.draw(st.integers(0, 9), label="wrong address?") == 0:
            url = parse_worker_url("elsewhere:9")
        detection = specs.detection(url, *sorted(models), mode=mode, runtime=Runtime.SGLANG)
        before = self.table.get(job.worker_id)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        else:
            superseded = (
                before.job is None or before.job.job_id != job.job_id or not before.job.active
            )
            if superseded or (result == "ready" and detection.url.key != before.key):
                problems.add(StaleJob)
        command: Command
        if result == "attempt":
            attempt = data.draw(st.integers(1, 5), label="attempt")
            command = commands.StartAttempt(
                worker_id=job.worker_id, job_id=job.job_id, attempt=attempt
            )
        elif result == "ready":
            command = commands.MarkReady(
                worker_id=job.worker_id, job_id=job.job_id, detection=detection
            )
        else:
            command = commands.MarkFailed(worker_id=job.worker_id, job_id=job.job_id, reason="down")

        outcome = self.apply(command, problems)

        after = outcome.worker
        if after is None:
            return
        assert before is not None
        assert after.job is not None
        assert after.id == before.id
        assert outcome.effects == []
        replacing = job.job_type is JobType.REPLACE
        if result == "attempt":
            assert after.job.state is JobState.RUNNING
            assert after.status is before.status
            assert after.spec == before.spec
        elif result == "ready":
            assert after.job.state is JobState.SUCCEEDED
            assert after.status is WorkerStatus.READY
            assert after.model_ids == models
            if replacing:  # the PUT's spec is swapped in, in place
                assert after.spec == job.spec
                assert after.spec_version == before.spec_version + 1
                assert after.is_healthy == before.is_healthy
            else:
                assert after.spec == before.spec
                assert after.spec_version == before.spec_version
                assert after.is_healthy
        else:
            assert after.job.state is JobState.FAILED
            assert after.spec == before.spec
            if replacing:  # the old spec keeps serving
                assert after.status is WorkerStatus.READY
                assert after.model_ids == before.model_ids
            else:
                assert after.status is WorkerStatus.FAILED
                assert after.model_ids == frozenset()

    @precondition(lambda self: bool(self.ids_ever))
    @rule(
        same_address=st.integers(0, 4),
        url=st.sampled_from(SPELLINGS),
        priority=st.integers(0, 100),
        model_id=st.none() | st.sampled_from(MODELS),
        data=st.data(),
    )
    def put(
        self,
        same_address: int,
        url: str,
        priority: int,
        model_id: str | None,
        data: st.DataObject,
    ) -> None:
        worker_id = self.pick_id(data, WorkerStatus.READY)
        before = self.table.get(worker_id)
        if before is not None and same_address:
            url = data.draw(
                st.sampled_from([s for s in SPELLINGS if parse_worker_url(s).key == before.key]),
                label="same address",
            )
        spec = worker_spec(url, priority=priority, model_id=model_id)
        if_match = self.if_match(data, before)
        job_slots = self.slots(data)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        else:
            if spec.url.key != before.key:
                problems.add(UrlMismatch)
            if before.status is WorkerStatus.DRAINING:
                problems.add(WorkerDraining)
            if if_match is not None and if_match != before.spec_version:
                problems.add(PreconditionFailed)
            if job_slots == 0:
                problems.add(RegistryBusy)

        outcome = self.apply(
            commands.ReplaceSpec(worker_id=worker_id, spec=spec, if_match=if_match),
            problems,
            job_slots=job_slots,
        )

        after = outcome.worker
        if after is None:
            return
        assert before is not None
        assert after.job is not None
        [start] = [effect for effect in outcome.effects if isinstance(effect, StartJob)]
        assert (start.worker_id, start.job_id, start.spec) == (worker_id, after.job.job_id, spec)
        if before.job is not None and before.job.active:
            assert CancelJob(worker_id=worker_id, job_id=before.job.job_id) in outcome.effects
        if before.status is WorkerStatus.READY:  # the old spec serves until detection is done
            assert start.job_type is JobType.REPLACE
            assert after.status is WorkerStatus.READY
            assert after.spec == before.spec
            assert after.spec_version == before.spec_version
            assert after.model_ids == before.model_ids
        else:  # nothing serves yet: the new spec applies at once
            assert start.job_type is JobType.ADD
            assert after.status is WorkerStatus.PENDING
            assert after.spec == spec
            assert after.spec_version == before.spec_version + 1

    @precondition(lambda self: bool(self.ids_ever))
    @rule(
        priority=st.none() | st.integers(0, 100),
        labels=st.none()
        | st.dictionaries(st.sampled_from(["zone", "tier"]), st.none() | st.sampled_from("xy")),
        data=st.data(),
    )
    def patch(
        self, priority: int | None, labels: dict[str, str | None] | None, data: st.DataObject
    ) -> None:
        worker_id = self.pick_id(data, WorkerStatus.READY)
        before = self.table.get(worker_id)
        patch = WorkerPatch(priority=priority, labels=labels)
        if_match = self.if_match(data, before)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        elif if_match is not None and if_match != before.spec_version:
            problems.add(PreconditionFailed)

        outcome = self.apply(
            commands.UpdateSpec(worker_id=worker_id, patch=patch, if_match=if_match), problems
        )

        after = outcome.worker
        if after is None:
            return
        assert before is not None
        assert after.spec == patch.apply(before.spec)
        assert after.spec_version == before.spec_version + 1
        assert after.status is before.status
        assert after.model_ids == before.model_ids
        old_job = before.job
        if old_job is not None and old_job.active and old_job.job_type is JobType.REPLACE:
            assert outcome.effects == [CancelJob(worker_id=worker_id, job_id=old_job.job_id)]
            assert after.job is not None
            assert after.job.state is JobState.CANCELLED
            assert after.job.message is not None and "PATCH" in after.job.message
        else:
            assert outcome.effects == []
            assert after.job == old_job

    @precondition(lambda self: bool(self.ids_ever))
    @rule(data=st.data())
    def begin_drain(self, data: st.DataObject) -> None:
        worker_id = self.pick_id(
            data, WorkerStatus.READY, WorkerStatus.PENDING, WorkerStatus.FAILED
        )
        before = self.table.get(worker_id)
        problems: set[type[GatewayError]] = set() if before else {WorkerNotFound}

        outcome = self.apply(commands.BeginDrain(worker_id=worker_id), problems)

        if outcome.worker is None:
            return
        assert before is not None
        after = self.table.get(worker_id)
        if before.status is WorkerStatus.DRAINING:
            assert after == before
            assert outcome.effects == []
        elif before.status is WorkerStatus.READY:
            assert after is not None
            assert after.status is WorkerStatus.DRAINING
            assert after.job is not None and after.job.job_type is JobType.REMOVE
        else:  # pending or failed: removed at once, its job cancelled
            assert after is None
            assert outcome.effects
            assert all(isinstance(effect, CancelJob) for effect in outcome.effects)
        running = before.job is not None and before.job.active
        if running and before.status is not WorkerStatus.DRAINING:
            assert before.job is not None
            assert CancelJob(worker_id=worker_id, job_id=before.job.job_id) in outcome.effects

    @precondition(lambda self: bool(self.ids_ever))
    @rule(data=st.data())
    def finish_drain(self, data: st.DataObject) -> None:
        worker_id = self.pick_id(data, WorkerStatus.DRAINING)
        before = self.table.get(worker_id)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        elif before.status is not WorkerStatus.DRAINING:
            problems.add(StaleJob)

        outcome = self.apply(commands.FinishDrain(worker_id=worker_id), problems)

        if outcome.worker is not None:
            assert self.table.get(worker_id) is None

    @precondition(lambda self: bool(self.ids_ever))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        worker_id = self.pick_id(data, WorkerStatus.FAILED)
        before = self.table.get(worker_id)
        job_slots = self.slots(data)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        else:
            if before.status is not WorkerStatus.FAILED:
                problems.add(WorkerNotFailed)
            if job_slots == 0:
                problems.add(RegistryBusy)

        outcome = self.apply(
            commands.RetryWorker(worker_id=worker_id), problems, job_slots=job_slots
        )

        if outcome.worker is not None:
            assert outcome.worker.status is WorkerStatus.PENDING
            assert outcome.worker.job is not None
            assert outcome.worker.job.job_type is JobType.RETRY

    @precondition(lambda self: bool(self.ids_ever))
    @rule(data=st.data())
    def recheck(self, data: st.DataObject) -> None:
        worker_id = self.pick_id(data, WorkerStatus.FAILED)
        before = self.table.get(worker_id)
        if before is not None and before.job is not None and data.draw(st.booleans()):
            job_id = before.job.job_id  # what the recheck timer of its last failure sends
        else:
            job_ids = [job.job_id for job in self.jobs] + [0]
            job_id = data.draw(st.sampled_from(job_ids), label="job_id")
        job_slots = self.slots(data)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        else:
            job = before.job
            if (
                before.status is not WorkerStatus.FAILED
                or job is None
                or job.job_id != job_id
                or job.active
            ):
                problems.add(StaleJob)
            if job_slots == 0:
                problems.add(RegistryBusy)

        outcome = self.apply(
            commands.RecheckWorker(worker_id=worker_id, job_id=job_id),
            problems,
            job_slots=job_slots,
        )

        if outcome.worker is not None:
            assert outcome.worker.status is WorkerStatus.FAILED
            assert outcome.worker.job is not None
            assert outcome.worker.job.job_type is JobType.RECHECK
            assert outcome.worker.job.active

    @precondition(lambda self: bool(self.ids_ever))
    @rule(healthy=st.booleans(), data=st.data())
    def set_health(self, healthy: bool, data: st.DataObject) -> None:
        worker_id = self.pick_id(data, WorkerStatus.READY, WorkerStatus.DRAINING)
        before = self.table.get(worker_id)
        problems: set[type[GatewayError]] = set()
        if before is None:
            problems.add(WorkerNotFound)
        elif before.status not in (WorkerStatus.READY, WorkerStatus.DRAINING):
            problems.add(StaleJob)

        outcome = self.apply(commands.SetHealth(worker_id=worker_id, healthy=healthy), problems)

        if outcome.worker is not None:
            assert outcome.worker.is_healthy is healthy
            assert self.table.get(worker_id) == outcome.worker

    # ---- invariants (DESIGN.md section 6) ------------------------------------------------

    @invariant()
    def every_indexed_id_is_a_live_worker(self) -> None:
        live = set(self.table.workers)
        indexed: set[str] = set(self.table.indexes.key_index().values())
        for index in (
            self.table.indexes.model_index(),
            self.table.indexes.type_index(),
            self.table.indexes.mode_index(),
        ):
            for ids in index.values():
                assert ids, "an index keeps an empty entry"
                indexed |= ids
        assert indexed <= live

    @invariant()
    def every_address_key_maps_to_exactly_one_live_worker(self) -> None:
        by_key = self.table.indexes.key_index()
        workers = self.table.workers
        assert len(by_key) == len(workers)
        for key, worker_id in by_key.items():
            assert workers[worker_id].key == key
        for worker_id, worker in workers.items():
            assert worker.id == worker_id
            assert by_key[worker.key] == worker_id

    @invariant()
    def the_model_index_is_exactly_the_models_of_ready_workers(self) -> None:
        expected: dict[str, set[str]] = {}
        for worker in self.table.workers.values():
            if worker.status is WorkerStatus.READY:
                for model in worker.model_ids:
                    expected.setdefault(model, set()).add(worker.id)
        actual = {model: set(ids) for model, ids in self.table.indexes.model_index().items()}
        assert actual == expected

    @invariant()
    def the_type_and_mode_indexes_match_the_records(self) -> None:
        by_type: dict[WorkerType, set[str]] = {}
        by_mode: dict[ConnectionMode, set[str]] = {}
        for worker in self.table.workers.values():
            by_type.setdefault(worker.spec.worker_type, set()).add(worker.id)
            if worker.connection_mode is not None:
                by_mode.setdefault(worker.connection_mode, set()).add(worker.id)
        assert {k: set(v) for k, v in self.table.indexes.type_index().items()} == by_type
        assert {k: set(v) for k, v in self.table.indexes.mode_index().items()} == by_mode

    @invariant()
    def no_id_is_reused_and_every_live_id_was_handed_out_by_a_create(self) -> None:
        assert len(set(self.ids_ever)) == len(self.ids_ever)
        assert set(self.table.workers) <= set(self.ids_ever)

    @invariant()
    def every_pending_worker_has_exactly_one_active_job(self) -> None:
        for worker in self.table.workers.values():
            if worker.status is WorkerStatus.PENDING:
                assert worker.job is not None
                assert worker.job.state in (JobState.QUEUED, JobState.RUNNING)
            if worker.status is WorkerStatus.DRAINING:
                assert worker.job is not None and worker.job.job_type is JobType.REMOVE
            if worker.status is WorkerStatus.FAILED:
                assert worker.model_ids == frozenset()

    @invariant()
    def the_snapshot_equals_the_table(self) -> None:
        snapshot = self.table.snapshot()
        assert dict(snapshot.workers) == dict(self.table.workers)
        assert dict(snapshot.by_key) == self.table.indexes.key_index()
        assert {model: set(ids) for model, ids in snapshot.by_model.items()} == {
            model: set(ids) for model, ids in self.table.indexes.model_index().items()
        }
        for ids in snapshot.by_model.values():
            assert len(ids) == len(set(ids))
        assert snapshot.version >= self.last_version
        self.last_version = snapshot.version


def test_random_command_sequences_keep_every_table_invariant() -> None:
    run_state_machine_as_test(
        TableMachine,
        settings=settings(max_examples=200, stateful_step_count=40, deadline=None, database=None),
    )
