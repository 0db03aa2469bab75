"""The console script: ``tmg serve``."""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from functools import partial
from typing import Any, get_origin, get_type_hints

import trio

from actors.core.config import FLAG, GatewayConfig
from actors.core.errors import GatewayError, WorkerAlreadyExists
from actors.core.model import WorkerSpec
from actors.core.urls import parse_worker_url
from actors.registry.service import Gateway
from actors.registry.startup import open_gateway
from actors.store import StoreError
from api.http.limits import ServerLimits
from api.serve import SERVERS, serve_api
from api.supervisor import process_count, supervise

log = logging.getLogger("tmg")
ADMIN_KEY_ENV = "TMG_ADMIN_API_KEY"


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``serve`` sub-parser: the server's own options here, then
    one per GatewayConfig field marked with ``flag(...)`` (actors/core/config.py)."""
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
    add(
        "--server",
        choices=SERVERS,
        default=_parameter_default(serve_api, "server"),
        help="HTTP server: http1 (built for the proxy's hot path) or hypercorn",
    )
    for flag, kind, limit, text in (  # the http1 server's limits: defaults from ServerLimits
        (
            "--max-connections",
            int,
            "max_connections",
            "client connections held at once (None: from the open-file limit; when full the "
            "oldest idle one is closed)",
        ),
        (
            "--write-timeout-secs",
            float,
            "write_timeout",
            "a client that reads nothing of its answer for this long is dropped",
        ),
    ):
        default = _field_default(ServerLimits, limit)
        add(flag, type=kind, default=default, help=f"http1 server: {text}")
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
    for option in config_options():
        add(f"--{option.name}", **option.keywords)
    add(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML file whose keys are these options (underscored); flags override it",
    )
    add(
        "--processes",
        type=process_count,
        default=1,
        metavar="N|auto",
        help="gateway processes sharing the port and the registry (auto: one per core); "
        "see api/supervisor.py",
    )
    add(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, sharing the port with other processes (set by --processes)",
    )
    add(
        "--own-port",
        action="store_true",
        help='also listen on a port of this process alone, printed as "own" (set by '
        "--processes: how each process's /metrics is scraped)",
    )
    add("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log")
    add("--log-format", default="text", choices=("text", "json"), help="log line format")
    add(
        "--shutdown-grace-secs",
        type=float,
        default=10.0,
        help="time in-flight requests get to finish on shutdown",
    )
    return parser, serve


@dataclass(frozen=True, slots=True)
class ConfigOption:
    """A GatewayConfig field as a ``tmg serve`` option: ``--<name>``, read into ``dest``."""

    field: str
    name: str
    keywords: dict[str, Any]  # add_argument's: type or action, default, help...

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def value(self, args: argparse.Namespace) -> Any:
        """The field's value from the parsed options (a repeated option is a tuple)."""
        value = getattr(args, self.dest)
        return tuple(value) if isinstance(value, list) else value


def config_options() -> list[ConfigOption]:
    """Every GatewayConfig field marked with ``flag(...)``, in field order."""
    types = get_type_hints(GatewayConfig)
    options = []
    for field in fields(GatewayConfig):
        if (spec := field.metadata.get(FLAG)) is None:
            continue
        default = None if field.default is MISSING else field.default  # None: made per run
        keywords: dict[str, Any] = {"help": spec["help"], "default": default}
        if types[field.name] in (int, float):
            keywords["type"] = types[field.name]
        if types[field.name] is bool:
            keywords["action"] = "store_true"
        if get_origin(types[field.name]) is tuple:  # repeatable: given once per item
            assert isinstance(field.default, tuple)
            keywords.update(action="append", default=list(field.default))
        keywords.update((k, spec[k]) for k in ("metavar", "choices") if spec[k] is not None)
        name = spec["name"] or field.name.replace("_", "-")
        options.append(ConfigOption(field.name, name, keywords))
    return options


def _field_default(cls: type, name: str) -> Any:
    [found] = [f for f in fields(cls) if f.name == name]
    return found.default


def _parameter_default(function: Callable[..., object], name: str) -> Any:
    return inspect.signature(function).parameters[name].default


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
            return f'{key} must be a list of strings, such as {key} = ["..."]'
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
    if args.server != "http1" and (args.processes > 1 or args.reuse_port or args.own_port):
        problems.append("--processes, --reuse-port and --own-port need --server http1")
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
    values = {option.field: option.value(args) for option in config_options()}
    return {name: value for name, value in values.items() if value is not None}  # None: made


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
            urls = await nursery.start(
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
                    reuse_port=args.reuse_port,
                    own_port=args.own_port,
                )
            )
            url, *own = urls
            auth = "admin key required" if args.admin_api_key else "no admin key"
            log.info("gateway listening on %s (%s, policy %s)", url, auth, args.policy)
            print(json.dumps({"listening": url, **({"own": own[0]} if own else {})}), flush=True)
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + args.shutdown_grace_secs + 1


async def _register_initial(gateway: Gateway, urls: Sequence[str]) -> None:
    for url in urls:
        try:
            worker = await gateway.add_worker(WorkerSpec(url=parse_worker_url(url)))
        except WorkerAlreadyExists as error:  # kept in the state file from an earlier run
            log.info("--worker-url %s is registered already as %s", url, error.worker_id)
            continue
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    if args.command == "serve" and args.processes > 1:
        sys.exit(trio.run(supervise, args, argv))
    if args.command == "serve":
        try:
            trio.run(serve_main, args)
        except StoreError as error:  # the state file cannot be used: say why, no traceback
            print(f"tmg serve: {error}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
