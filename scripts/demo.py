"""`make run`: the gateway on its embedded default with two fake workers, ready to curl.

Starts two fake SGLang workers on free loopback ports, the gateway on 127.0.0.1:30000 (or
--port), registers the first worker, and prints commands to try. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio

if __package__ in (None, ""):  # run as a file: make the project root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import open_gateway, worker_spec
from api.serve import serve_api
from scripts.fake_worker import FakeWorkerConfig, serve_fake_workers


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery, open_gateway() as gateway:
        workers = await nursery.start(
            serve_fake_workers, [0, 0], FakeWorkerConfig(model="demo-model")
        )
        [url] = await nursery.start(partial(serve_api, gateway, bind=f"127.0.0.1:{port}"))
        first = await gateway.add_worker(worker_spec(f"127.0.0.1:{workers[0].port}"))
        await gateway.wait_status(first.id, "ready", 10)
        second = workers[1].port
        print(
            f"""
trio-model-gateway demo: gateway at {url}, fake workers on ports {workers[0].port} and {second}
(model "demo-model"). Worker {first.id} is registered and ready. Try:

  JSON='Content-Type: application/json'
  CHAT='{{"model": "demo-model", "messages": [{{"role": "user", "content": "hi"}}]}}'

  curl -s {url}/workers | python3 -m json.tool
  curl -s -X POST {url}/workers -H "$JSON" -d '{{"url": "127.0.0.1:{second}"}}'
  curl -s -X PATCH {url}/workers/{first.id} -H "$JSON" -d '{{"priority": 10}}'
  curl -s -X DELETE {url}/workers/{first.id}
  curl -s {url}/v1/chat/completions -H "$JSON" -d "$CHAT"
  curl -s {url}/readiness
  open {url}/docs   (the API description; /openapi.json for machines)

Ctrl-C stops the demo.
""",
            flush=True,
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=30000)
    trio.run(main, parser.parse_args().port)
