"""Recovery: the table's rules for stored workers, and `tmg serve --state` refusing a state file
it cannot use (corrupt, truncated, newer, in use) with one clear line, leaving the file as it
was."""

from __future__ import annotations

import os
import random
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
import trio

from actors.core.codec import restore_workers, stored_worker
from actors.core.commands import (
    BeginDrain,
    CreateWorker,
    MarkFailed,
    MarkReady,
    RecheckWorker,
    StartJob,
)
from actors.core.jobs import UuidSource
from actors.core.model import JobState, JobType, WorkerStatus
from actors.core.table import WorkerTable
from actors.store import Batch, SqliteStore
from tests.test_codec import detected, spec

ROOT = Path(__file__).resolve().parent.parent


# ---- the table's rules ------------------------------------------------------------------------


def test_an_id_source_continues_past_its_stored_high_water_mark() -> None:
    first = UuidSource()
    assert first.fresh
    ids = [first() for _ in range(3)]
    again = UuidSource(first.prefix, first.count + 1000)
    assert not again.fresh
    following = again()
    assert following.startswith(first.prefix) and following not in ids
    assert int(following.rsplit("-", 1)[1], 16) == 1004


def test_a_recheck_in_flight_restarts_and_a_finished_failure_keeps_its_job() -> None:
    table = WorkerTable()
    rechecked = table.apply(CreateWorker(spec=spec("a:1")), now=1.0)
    resting = table.apply(CreateWorker(spec=spec("b:1")), now=1.0)
    table.take_effects()
    for worker in (rechecked, resting):
        assert worker.job is not None
        table.apply(MarkFailed(worker_id=worker.id, job_id=worker.job.job_id, reason="no"), now=2.0)
    failed_job = table.get(rechecked.id).job  # type: ignore[union-attr]
    assert failed_job is not None
    table.apply(RecheckWorker(worker_id=rechecked.id, job_id=failed_job.job_id), now=3.0)
    stored = [stored_worker(table, worker_id) for worker_id in table.workers]
    restored = restore_workers(stored, now=10.0, first_job_id=table.next_job_id)
    jobs = {e.worker_id: e for e in restored.take_effects() if isinstance(e, StartJob)}
    assert set(jobs) == {rechecked.id}
    assert jobs[rechecked.id].job_type is JobType.RECHECK
    again = restored.get(resting.id)
    assert again is not None and again.status is WorkerStatus.FAILED
    assert again.job is not None and again.job.state is JobState.FAILED
    assert restored.take_changes().upserted == {rechecked.id}  # only the restarted one


def test_undo_puts_every_touched_worker_back_as_it_was() -> None:
    table = WorkerTable()
    kept = table.apply(CreateWorker(spec=spec("a:1")), now=1.0)
    [start] = [e for e in table.take_effects() if isinstance(e, StartJob)]
    table.apply(
        MarkReady(worker_id=kept.id, job_id=start.job_id, detection=detected("a:1", "m")), now=2.0
    )
    table.take_changes()
    before = table.snapshot()
    table.apply(BeginDrain(worker_id=kept.id), now=3.0)
    table.finish_drain(kept.id)
    created = table.apply(CreateWorker(spec=spec("b:1")), now=3.0)
    changes = table.take_changes()
    assert changes.deleted == {kept.id} and changes.upserted == {created.id}
    table.undo(changes)
    after = table.snapshot()
    assert dict(after.workers) == dict(before.workers)
    assert dict(after.by_key) == dict(before.by_key)
    assert dict(after.by_model) == dict(before.by_model)
    assert table.take_effects() == []
    assert table.take_changes().empty


# ---- tmg serve --state refuses what it cannot use ----------------------------------------


def fill(path: Path, count: int = 200) -> None:
    upserts = {
        f"w{n}": {"id": f"w{n}", "spec": {"url": f"10.0.0.{n % 250}:{8000 + n}"}, "spec_version": 1}
        for n in range(count)
    }
    with SqliteStore(path) as store:
        store.commit(Batch(upserts=upserts, id_prefix="p-", id_high_water=1000))


def corrupt(path: Path) -> str:
    fill(path)
    with open(path, "r+b") as file:
        file.seek(2 * 4096)
        file.write(random.Random(1).randbytes(4096))
    return "is corrupt"


def truncated(path: Path) -> str:
    fill(path)
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2 // 4096 * 4096)
    return "is truncated"


def newer(path: Path) -> str:
    fill(path, 3)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA user_version = 3")
    return "schema version 3, newer than this gateway's 2"


def not_sqlite(path: Path) -> str:
    path.write_text('{"workers": []}\n' * 20)
    return "is not an SQLite database"


def files(path: Path) -> dict[str, bytes]:
    """Every file the state file's name begins with, and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.parent.glob(path.name + "*"))}


async def serve_refused(path: Path) -> str:
    """Run `tmg serve --state path`; it must exit 2 with one line on stderr (returned)."""
    command = [sys.executable, "-m", "api.cli", "serve", "--port", "0", "--state", str(path)]
    with trio.fail_after(30):
        result = await trio.run_process(
            command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "tmg serve:" in line]
    assert str(path) in line
    return line


@pytest.mark.parametrize("damage", [corrupt, truncated, newer, not_sqlite])
async def test_tmg_serve_refuses_a_damaged_or_newer_state_file_and_leaves_it_unchanged(
    tmp_path: Path, damage: object
) -> None:
    path = tmp_path / "state.db"
    found = damage(path)  # type: ignore[operator]
    before = files(path)
    line = await serve_refused(path)
    assert found in line
    after = files(path)
    after.pop(path.name + ".lock", None)  # the lock file (empty once released) may appear
    assert after == {name: data for name, data in before.items() if not name.endswith(".lock")}


async def test_tmg_serve_refuses_a_state_file_in_use_naming_the_holders_pid(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    fill(path, 3)
    with SqliteStore(path):
        before = files(path)
        line = await serve_refused(path)
        assert f"in use by another gateway (pid {os.getpid()}" in line
        assert files(path) == before
