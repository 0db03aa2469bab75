"""The console script: ``tmg serve``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from actors.core.config import GatewayConfig
from actors.core.errors import GatewayError
from actors.core.model import WorkerSpec
from actors.core.urls import parse_worker_url
from actors.registry.service import Gateway, open_gateway
from api.serve import SERVERS, serve_api

log = logging.getLogger("tmg")
ADMIN_KEY_ENV = "TMG_ADMIN_API_KEY"
POLICIES = ("round_robin", "random", "power_of_two", "consistent_hash", "cache_aware")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``serve`` sub-parser."""
    parser = argparse.ArgumentParser(prog="tmg", description="A model gateway built on trio.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = serve.add_argument
    add("--host", default="127.0.0.1", help="address to bind (loopback unless you say otherwise)")
    add("--port", type=int, default=30000, help="port to bind (0: any free port)")
    add(
        "--worker-url",
        action="append",
        default=[],
        metavar="URL",
        help="register this worker at start (repeatable)",
    )
    add("--policy", choices=POLICIES, default="round_robin", help="default routing policy")
    add(
        "--server",
        choices=SERVERS,
        default="http1",
        help="HTTP server: http1 (built for the proxy's hot path) or hypercorn",
    )
    add(
        "--max-connections",
        type=int,
        default=None,
        help="http1 server: client connections held at once (default: from the open-file limit; "
        "when full the oldest idle one is closed)",
    )
    add(
        "--write-timeout-secs",
        type=float,
        default=30.0,
        help="http1 server: a client that reads nothing of its answer for this long is dropped",
    )
    add(
        "--retries",
        type=int,
        default=2,
        help="a failed inference request is retried on up to this many other workers",
    )
    add(
        "--admin-api-key",
        default=None,
        help=f"Bearer key for mutating /workers routes (or set {ADMIN_KEY_ENV})",
    )
    add(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="allow a non-loopback bind without an admin key",
    )
    add("--registration-concurrency", type=int, default=8, help="registrations detected at once")
    add(
        "--registration-queue-size",
        type=int,
        default=1024,
        help="registrations waiting; beyond it POST /workers answers 503",
    )
    add("--max-connection-attempts", type=int, default=20, help="default per worker")
    add("--registration-timeout-secs", type=float, default=60.0, help="default per worker")
    add(
        "--recheck-interval-secs",
        type=float,
        default=30.0,
        help="default re-probe interval of a failed worker (0: off)",
    )
    add("--drain-timeout-secs", type=float, default=30.0, help="default per worker")
    add(
        "--upstream-connect-timeout-secs",
        type=float,
        default=5.0,
        help="time to connect to a worker before trying another",
    )
    add(
        "--upstream-read-timeout-secs",
        type=float,
        default=300.0,
        help="time a worker may take to start its answer, and between two pieces of a stream",
    )
    add(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="allow worker addresses in this network although the address rules refuse it "
        "(link-local, metadata, ...); repeatable",
    )
    add("--state", default=":memory:", help="durable registry file (:memory: keeps none)")
    add(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML file whose keys are these options (underscored); flags override it",
    )
    add("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add("--log-format", default="text", choices=("text", "json"))
    add(
        "--shutdown-grace-secs",
        type=float,
        default=10.0,
        help="time in-flight requests get to finish on shutdown",
    )
    return parser, serve


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, serve = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        serve.set_defaults(**_read_config(serve, args.config))
        args = parser.parse_args(argv)
    if args.admin_api_key is None:
        args.admin_api_key = os.environ.get(ADMIN_KEY_ENV) or None
    problems = _check(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        parser.error(f"--config {path}: {error}")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(data) - set(actions) - {"help", "config"})
    if unknown:
        parser.error(f"--config {path}: unknown keys {', '.join(unknown)}")
    problems = [
        problem
        for key, value in data.items()
        if (problem := _config_value_problem(key, value, actions[key])) is not None
    ]
    if problems:
        parser.error(f"--config {path}: {'; '.join(problems)}")
    return data


def _config_value_problem(key: str, value: object, action: argparse.Action) -> str | None:
    """Why a TOML value cannot stand for this option, or None: the same types the flag takes."""
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return f"{key} must be a list of strings, such as {key} = [\"...\"]"
        return None
    if isinstance(action, argparse._StoreTrueAction):
        return None if isinstance(value, bool) else f"{key} must be true or false"
    if action.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{key} must be an integer"
    if action.type is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"{key} must be a number"
    if not isinstance(value, str):
        return f"{key} must be a string"
    if action.choices is not None and value not in action.choices:
        return f"{key} must be one of {', '.join(map(str, action.choices))}"
    return None


def _check(args: argparse.Namespace) -> list[str]:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port} is outside 0..65535")
    if args.state != ":memory:":
        problems.append("--state: only :memory: is supported in this version")
    try:
        config = GatewayConfig(**_config_fields(args))
    except ValueError as error:
        problems.append(str(error))
        config = GatewayConfig()
    for url in args.worker_url:
        try:
            config.check_address(WorkerSpec(url=parse_worker_url(url)))
        except GatewayError as error:
            problems.append(f"--worker-url {error.message}")
    if (
        not _is_loopback(args.host)
        and not args.admin_api_key
        and not args.allow_unauthenticated_admin
    ):
        problems.append(
            f"--host {args.host} is not a loopback address and no admin key is set: anyone who "
            f"reaches it could change the registry. Set --admin-api-key (or {ADMIN_KEY_ENV}), or "
            "pass --allow-unauthenticated-admin if that is what you want"
        )
    return problems


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _config_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "registration_concurrency": args.registration_concurrency,
        "registration_queue_size": args.registration_queue_size,
        "max_connection_attempts": args.max_connection_attempts,
        "registration_timeout_secs": args.registration_timeout_secs,
        "recheck_interval_secs": args.recheck_interval_secs,
        "drain_timeout_secs": args.drain_timeout_secs,
        "policy": args.policy,
        "retries": args.retries,
        "upstream_connect_timeout_secs": args.upstream_connect_timeout_secs,
        "upstream_read_timeout_secs": args.upstream_read_timeout_secs,
        "allowed_networks": tuple(args.allow_network),
    }


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


async def serve_main(args: argparse.Namespace) -> None:
    stop = trio.Event()
    async with open_gateway(GatewayConfig(**_config_fields(args))) as gateway:
        await _register_initial(gateway, args.worker_url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, stop)
            host = f"[{args.host}]" if ":" in args.host else args.host
            [url] = await nursery.start(
                partial(
                    serve_api,
                    gateway,
                    bind=f"{host}:{args.port}",
                    shutdown_trigger=stop.wait,
                    admin_api_key=args.admin_api_key,
                    graceful_timeout=args.shutdown_grace_secs,
                    server=args.server,
                    max_connections=args.max_connections,
                    write_timeout=args.write_timeout_secs,
                )
            )
            auth = "admin key required" if args.admin_api_key else "no admin key"
            log.info("gateway listening on %s (%s, policy %s)", url, auth, args.policy)
            print(json.dumps({"listening": url}), flush=True)
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + args.shutdown_grace_secs + 1


async def _register_initial(gateway: Gateway, urls: Sequence[str]) -> None:
    for url in urls:
        try:
            worker = await gateway.add_worker(WorkerSpec(url=parse_worker_url(url)))
        except GatewayError as error:
            log.error("--worker-url %s: %s", url, error.message)
            continue
        log.info("registering %s as %s", url, worker.id)


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            stop.set()
            return


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    if args.command == "serve":
        trio.run(serve_main, args)


if __name__ == "__main__":
    main()
