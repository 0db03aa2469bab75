"""A table dumps to plain JSON-able data and restores to the same records and indexes."""

from __future__ import annotations

import json

import pytest

from actors.core.codec import dump_table, restore_table
from actors.core.commands import (
    BeginDrain,
    CreateWorker,
    MarkFailed,
    MarkReady,
    ReplaceSpec,
    StartJob,
)
from actors.core.model import (
    ConnectionMode,
    Detection,
    JobState,
    ModelCard,
    Runtime,
    WorkerSpec,
    WorkerStatus,
)
from actors.core.table import WorkerTable
from actors.core.urls import parse_worker_url


def spec(address: str, **fields: object) -> WorkerSpec:
    return WorkerSpec(url=parse_worker_url(address), **fields)  # type: ignore[arg-type]


def detected(address: str, *models: str) -> Detection:
    return Detection(
        url=parse_worker_url(address).with_scheme("http"),
        connection_mode=ConnectionMode.HTTP,
        runtime=Runtime.SGLANG,
        models=tuple(ModelCard(id=m, details={"context_length": 4096}) for m in models),
        labels={"tp_size": "1"},
    )


def started(table: WorkerTable) -> dict[str, int]:
    return {e.worker_id: e.job_id for e in table.take_effects() if isinstance(e, StartJob)}


def populated() -> tuple[WorkerTable, dict[str, str]]:
    table = WorkerTable()
    ids = {}
    for name in ("ready", "failed", "pending", "replacing", "draining"):
        extra = {"api_key": "sk-secret", "labels": {"zone": "a"}} if name == "ready" else {}
        worker = table.apply(CreateWorker(spec=spec(f"{name}:8000", **extra)), now=1.0)
        ids[name] = worker.id
    jobs = started(table)
    for name in ("ready", "replacing", "draining"):
        table.apply(
            MarkReady(
                worker_id=ids[name],
                job_id=jobs[ids[name]],
                detection=detected(f"{name}:8000", "m1", "m2"),
            ),
            now=2.0,
        )
    table.apply(
        MarkFailed(
            worker_id=ids["failed"], job_id=jobs[ids["failed"]], reason="connection refused"
        ),
        now=2.0,
    )
    table.apply(
        ReplaceSpec(worker_id=ids["replacing"], spec=spec("replacing:8000", priority=9)), now=3.0
    )
    table.apply(BeginDrain(worker_id=ids["draining"]), now=3.0)
    table.take_effects()
    return table, ids


def test_a_dump_is_plain_json_and_restores_the_same_records_and_indexes() -> None:
    table, ids = populated()
    data = json.loads(json.dumps(dump_table(table)))
    restored = restore_table(data, now=10.0)
    for name in ("ready", "failed"):
        assert restored.get(ids[name]) == table.get(ids[name])
    ready = restored.get(ids["ready"])
    assert ready is not None and ready.spec.api_key == "sk-secret"
    assert restored.indexes.model_index() == {
        "m1": frozenset({ids["ready"], ids["replacing"]}),
        "m2": frozenset({ids["ready"], ids["replacing"]}),
    }
    assert set(restored.indexes.key_index()) == {
        "ready:8000",
        "failed:8000",
        "pending:8000",
        "replacing:8000",
    }


def test_work_in_progress_restarts_after_a_restore() -> None:
    table, ids = populated()
    restored = restore_table(json.loads(json.dumps(dump_table(table))), now=10.0)
    jobs = started(restored)
    # the registration and the PUT in progress are queued again, from their first attempt
    assert set(jobs) == {ids["pending"], ids["replacing"]}
    assert min(jobs.values()) > max(  # job ids continue, never reused
        w.job.job_id for w in table.workers.values() if w.job is not None
    )
    replacing = restored.get(ids["replacing"])
    assert replacing is not None and replacing.spec.priority == 50  # the old spec serves
    assert replacing.job is not None and replacing.job.state is JobState.QUEUED
    assert replacing.job.job_id == jobs[ids["replacing"]]
    swap = restored.replacement(ids["replacing"])
    assert swap is not None and swap.priority == 9  # ... while the PUT's spec is detected
    assert restored.get(ids["draining"]) is None
    pending = restored.get(ids["pending"])
    assert pending is not None and pending.status is WorkerStatus.PENDING
    changes = restored.take_changes()
    assert changes.deleted == {ids["draining"]}  # the store drops it too
    assert changes.upserted == {ids["pending"], ids["replacing"]}  # new jobs; the rest as stored


def test_a_put_in_progress_without_its_spec_is_recorded_as_cancelled_after_a_restore() -> None:
    table, ids = populated()
    data = dump_table(table)
    for plain in data["workers"]:
        plain.pop("replacing", None)  # as a dump from before the spec was kept
    restored = restore_table(data, now=10.0)
    replacing = restored.get(ids["replacing"])
    assert replacing is not None and replacing.job is not None
    assert replacing.job.state is JobState.CANCELLED
    assert set(started(restored)) == {ids["pending"]}


def test_a_dump_in_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        restore_table({"format": 99, "workers": [], "next_job_id": 1}, now=0.0)
