"""run_registrar(): the registration workflows.

N tasks take jobs from the bounded jobs channel. Each job runs inside the cancel scope the
registry gave it, so a DELETE (or a newer PUT) of a worker stops its detection at once. A job
detects with retries and exponential backoff, bounded by the worker's
``max_connection_attempts`` and ``registration_timeout_secs``, then tells the registry the
result. A failed registration is re-probed every ``recheck_interval_secs`` until it answers or is
deleted. Every answer from the registry that says the job was superseded ends the job quietly;
a result the registry could not store (``StoreUnavailable``) is sent again after a backoff.

After a restart, the failed workers keep their recheck: ``rechecks`` (worker id, failed job id,
interval) are scheduled as if their registration had just failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from actors.core.commands import MarkFailed, MarkReady, RecheckWorker, StartAttempt
from actors.core.config import GatewayConfig
from actors.core.errors import DetectionError, GatewayStopped, RegistryBusy, RegistryError
from actors.core.model import Detection, JobType, WorkerId, WorkerSpec
from actors.registry.detection import Probe
from actors.registry.mailbox import Outbox, ask, tell
from actors.registry.registry import Job, JobsReceive, StoreUnavailable

log = logging.getLogger("tmg.registrar")


async def run_registrar(
    jobs: JobsReceive,
    registry: Outbox,
    detector: Probe,
    *,
    config: GatewayConfig,
    record: Callable[[str], None] = lambda outcome: None,
    rechecks: Sequence[tuple[WorkerId, int, float]] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``record(outcome)`` is told how each job ended: succeeded, failed or cancelled."""
    async with trio.open_nursery() as nursery:
        registrar = _Registrar(registry, detector, config, nursery, record)
        async with jobs:
            for _ in range(config.registration_concurrency):
                nursery.start_soon(registrar.take_jobs, jobs.clone())
        for worker_id, job_id, interval in rechecks:
            nursery.start_soon(registrar.recheck_later, worker_id, job_id, interval)
        task_status.started()


class _Registrar:
    def __init__(
        self,
        registry: Outbox,
        detector: Probe,
        config: GatewayConfig,
        nursery: trio.Nursery,
        record: Callable[[str], None],
    ) -> None:
        self._record = record
        self._registry = registry
        self._detector = detector
        self._config = config
        self._nursery = nursery  # for recheck timers of failed workers

    async def take_jobs(self, jobs: JobsReceive) -> None:
        async with jobs:
            async for job in jobs:
                outcome = "cancelled"
                with job.cancel_scope:
                    try:
                        outcome = await self._run(job)
                    except GatewayStopped:
                        return
                    except RegistryError as error:  # superseded or removed meanwhile
                        log.debug(
                            "job %s for %s ended: %s", job.start.job_id, job.start.worker_id, error
                        )
                self._record(outcome)

    async def _run(self, job: Job) -> str:
        """Run one job to its end; the outcome: succeeded or failed."""
        start = job.start
        spec = start.spec  # resolved by the Gateway: every timing field is set
        assert spec.max_connection_attempts is not None
        assert spec.registration_timeout_secs is not None
        limit = 1 if start.job_type is JobType.RECHECK else spec.max_connection_attempts
        timeout = spec.registration_timeout_secs
        last_error = "no attempt finished"
        attempt = 0
        with trio.move_on_after(timeout) as budget:
            for attempt in range(1, limit + 1):
                await tell(  # progress for GET readers; the answer changes nothing here
                    self._registry,
                    StartAttempt(
                        worker_id=start.worker_id,
                        job_id=start.job_id,
                        attempt=attempt,
                        message=None if attempt == 1 else last_error,
                    ),
                )
                detection = await self._probe(spec, min(spec.health.timeout_secs, timeout))
                if isinstance(detection, DetectionError):
                    last_error = detection.message
                    log.info(
                        "worker %s: attempt %d failed: %s", start.worker_id, attempt, last_error
                    )
                    if not getattr(detection, "retryable", True):
                        break  # e.g. the address is this gateway itself: no retry can help
                else:
                    await self._ask(
                        MarkReady(
                            worker_id=start.worker_id, job_id=start.job_id, detection=detection
                        )
                    )
                    log.info("worker %s (%s) is ready", start.worker_id, detection.url)
                    return "succeeded"
                if attempt < limit:
                    await trio.sleep(self._config.backoff(attempt))
        if budget.cancelled_caught:
            reason = f"timed out after {timeout:g} s ({attempt} attempts); last error: {last_error}"
        elif start.job_type is JobType.RECHECK:
            reason = f"still unreachable on recheck: {last_error}"
        else:
            reason = f"gave up after {attempt} attempts: {last_error}"
        await self._ask(MarkFailed(worker_id=start.worker_id, job_id=start.job_id, reason=reason))
        log.warning("worker %s: registration failed: %s", start.worker_id, reason)
        interval = spec.recheck_interval_secs or 0.0
        if start.job_type is not JobType.REPLACE and interval > 0:
            self._nursery.start_soon(self.recheck_later, start.worker_id, start.job_id, interval)
        return "failed"

    async def _probe(self, spec: WorkerSpec, seconds: float) -> Detection | DetectionError:
        """One detection attempt: what it found, or why it failed."""
        with trio.move_on_after(seconds):
            try:
                return await self._detector.detect(spec)
            except DetectionError as error:
                return error
        return DetectionError(f"{spec.url.text} did not answer detection within {seconds:g} s")

    async def recheck_later(self, worker_id: WorkerId, job_id: int, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await self._ask(RecheckWorker(worker_id=worker_id, job_id=job_id))
            except RegistryBusy:
                continue  # the queue is full now: try again after another interval
            except (RegistryError, GatewayStopped):
                return  # deleted, retried or recovered meanwhile
            return

    async def _ask(self, message: MarkReady | MarkFailed | RecheckWorker) -> None:
        # no timeout: the registry never blocks, and its inbox is bounded (backpressure)
        refusals = 0
        while True:
            try:
                await ask(self._registry, message)
                return
            except StoreUnavailable:  # not stored, so not made: send it again
                refusals += 1
                await trio.sleep(self._config.backoff(refusals))
