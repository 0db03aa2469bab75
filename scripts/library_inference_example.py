"""Inference through the gateway as a library call, and the registry as a feed (no HTTP).

Run: .venv/bin/python scripts/library_inference_example.py
It starts a fake worker process (scripts/fake_worker.py on an OS-chosen port), opens a gateway
in this process, follows the registry's events while it registers the worker, then sends one
chat completion, reads one stream to the end, leaves another half-way, and shows the typed
errors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import trio
import trio.testing

if __package__ in (None, ""):  # run as a file: make the project root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import open_gateway, worker_spec
from actors.dataplane.client import ModelNotFound
from actors.registry.service import Gateway

CHAT = {"model": "my-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


async def follow(gateway: Gateway, *, task_status: trio.TaskStatus[None]) -> None:
    async with gateway.watch() as events:
        task_status.started()
        async for event in events:
            worker = event.worker
            status = worker.status.value if worker is not None else ""
            print(f"  event {event.seq} {event.kind.value} {status}")


async def main() -> None:
    command = [sys.executable, "scripts/fake_worker.py", "--ports", "0", "--model", "my-model"]
    command += ["--token-delay", "0.01"]
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
        [port] = json.loads(line)["listening"]
        try:
            async with open_gateway() as gateway:
                await nursery.start(follow, gateway)
                worker = await gateway.add_worker(worker_spec(f"127.0.0.1:{port}"))
                await gateway.wait_status(worker.id, "ready", timeout=10)

                answer = await gateway.request("/v1/chat/completions", CHAT)
                print("request:", answer.status, answer.worker_id)
                print("  says:", answer.json()["choices"][0]["message"]["content"])

                async with gateway.stream("/v1/chat/completions", {**CHAT, "stream": True}) as s:
                    words = [c["choices"][0]["delta"].get("content", "") async for c in s]
                print("stream read to the end:", "".join(words))

                long = {**CHAT, "stream": True, "max_tokens": 10_000}
                async with gateway.stream("/v1/chat/completions", long) as s:
                    async for _ in s:
                        break  # leaving the block cancels the upstream request
                print("stream left early; in flight now:", gateway.inflight.count(worker.id))

                try:
                    await gateway.request("/v1/chat/completions", {**CHAT, "model": "other"})
                except ModelNotFound as error:
                    print("unknown model:", error.status, error.message)
                await gateway.remove_worker(worker.id)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()  # stop following
        finally:
            process.terminate()
            with trio.CancelScope(shield=True):
                await process.wait()


if __name__ == "__main__":
    trio.run(main)
