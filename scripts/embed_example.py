"""Embedding the gateway in a trio application, without HTTP (the README shows this file).

Run: .venv/bin/python scripts/embed_example.py
It starts one fake worker in-process, registers it, waits for it to be ready, updates it,
replaces it (PUT), and removes it, printing what the registry says at each step.
"""

from __future__ import annotations

import trio

if __package__ in (None, ""):  # run as a file: make the project root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import WorkerPatch, open_gateway, worker_spec
from scripts.fake_worker import FakeWorkerConfig, serve_fake_workers


async def main() -> None:
    async with trio.open_nursery() as nursery:
        [fake] = await nursery.start(serve_fake_workers, [0], FakeWorkerConfig(model="my-model"))
        async with open_gateway() as gateway:
            worker = await gateway.add_worker(worker_spec(f"127.0.0.1:{fake.port}", priority=20))
            print("added:", worker.id, worker.status)  # pending, under its final id
            worker = await gateway.wait_status(worker.id, "ready", timeout=10)
            print("ready:", worker.url, sorted(worker.model_ids), worker.runtime)
            worker = await gateway.update_worker(worker.id, WorkerPatch(labels={"zone": "a"}))
            print("patched:", worker.spec.labels, "spec version", worker.spec_version)
            spec = worker_spec(f"http://127.0.0.1:{fake.port}", priority=90)
            await gateway.replace_worker(worker.id, spec)  # re-detects; the old spec serves
            while (job := gateway.get_worker(worker.id).job) is not None and job.active:
                await gateway.wait_changed()
            print("replaced:", gateway.get_worker(worker.id).spec.priority)
            print("listed:", [w.id for w in gateway.list_workers(model="my-model")])
            await gateway.remove_worker(worker.id)  # idle: gone at once
            print("after remove:", gateway.list_workers())
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
