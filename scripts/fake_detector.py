"""A detector that answers at once, for benchmarks and tests that measure the registry, not
the network: every worker is an HTTP worker serving one model, and always healthy. Nothing is
ever contacted, so any address (even one no packet could reach) is safe to register with it."""

from __future__ import annotations

import trio

from actors.core.model import ConnectionMode, Detection, ModelCard, Runtime, WorkerSpec
from actors.core.urls import WorkerUrl


class InstantDetector:
    def __init__(self, model: str = "m", runtime: Runtime = Runtime.SGLANG) -> None:
        self._models = (ModelCard(id=model),)
        self._runtime = runtime

    async def detect(self, spec: WorkerSpec) -> Detection:
        await trio.lowlevel.checkpoint()
        url = spec.url if spec.url.scheme is not None else spec.url.with_scheme("http")
        return Detection(
            url=url,
            connection_mode=ConnectionMode.HTTP,
            runtime=self._runtime,
            models=self._models,
        )

    async def check_health(self, spec: WorkerSpec, url: WorkerUrl) -> str | None:
        await trio.lowlevel.checkpoint()
        return None
