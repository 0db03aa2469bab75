"""The console script: flags, the public-bind refusal, and a real `tmg serve` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import MISSING, fields, replace
from pathlib import Path

import httpx
import pytest
import trio

from actors.core.config import FLAG, GatewayConfig
from actors.dataplane.routing import POLICIES
from api.cli import ADMIN_KEY_ENV, _config_fields, build_parser, config_options, parse_args
from api.http.limits import ServerLimits
from api.serve import SERVERS
from tests.conftest import StartWorkers


def test_serve_help_lists_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--worker-url",
        "--policy",
        "--admin-api-key",
        "--allow-unauthenticated-admin",
        "--registration-concurrency",
        "--registration-queue-size",
        "--state",
        "--config",
        "--log-level",
        "--log-format",
        "--shutdown-grace-secs",
    ):
        assert flag in text
    assert "127.0.0.1" in text and "30000" in text and "1024" in text


def test_defaults_bind_loopback_with_the_documented_sizes() -> None:
    args = parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 30000)
    assert (args.registration_concurrency, args.registration_queue_size) == (8, 1024)


def test_a_public_bind_without_an_admin_key_refuses_to_start(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["serve", "--host", "0.0.0.0"])
    assert exit_info.value.code == 2
    assert "admin key" in capsys.readouterr().err
    assert parse_args(["serve", "--host", "0.0.0.0", "--admin-api-key", "k"]).admin_api_key == "k"
    assert parse_args(["serve", "--host", "0.0.0.0", "--allow-unauthenticated-admin"])
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-env")
    assert parse_args(["serve", "--host", "::"]).admin_api_key == "from-env"


def test_bad_flags_are_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in (
        (["serve", "--worker-url", "ftp://a:1"], "--worker-url"),
        (["serve", "--registration-concurrency", "0"], "registration_concurrency"),
        (["serve", "--state", ""], "state"),
        (["serve", "--port", "70000"], "--port"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert text in capsys.readouterr().err


def test_a_config_file_sets_defaults_that_flags_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tmg.toml"
    config.write_text('port = 31000\npolicy = "random"\nworker_url = ["127.0.0.1:41000"]\n')
    args = parse_args(["serve", "--config", str(config), "--policy", "power_of_two"])
    assert (args.port, args.policy, args.worker_url) == (31000, "power_of_two", ["127.0.0.1:41000"])
    config.write_text("prot = 1\n")
    with pytest.raises(SystemExit):
        parse_args(["serve", "--config", str(config)])
    assert "prot" in capsys.readouterr().err


def test_every_serve_option_is_a_known_config_key() -> None:
    _, serve = build_parser()
    assert {"host", "port", "worker_url", "shutdown_grace_secs"} <= {a.dest for a in serve._actions}


async def test_tmg_serve_registers_its_worker_urls_and_stops_cleanly_on_sigterm(
    start_workers: StartWorkers,
) -> None:
    [worker] = await start_workers(1)
    command = [
        sys.executable,
        "-m",
        "api.cli",
        "serve",
        "--port",
        "0",
        "--worker-url",
        f"127.0.0.1:{worker.port}",
        "--log-level",
        "warning",
    ]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "tmg serve exited before it listened"
                line += chunk
            url = json.loads(line)["listening"]
            assert url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                listing = (await client.get("/workers")).json()
                health = await client.get("/health")
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
    assert health.text == "OK"
    assert [w["url"].rsplit(":", 1)[1] for w in listing["workers"]] == [str(worker.port)]
    assert code == 0


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('worker_url = "127.0.0.1:8000"', "worker_url must be a list of strings"),
        ('port = "30000"', "port must be an integer"),
        ("port = true", "port must be an integer"),
        ('drain_timeout_secs = "5"', "drain_timeout_secs must be a number"),
        ('allow_unauthenticated_admin = "yes"', "allow_unauthenticated_admin must be true or"),
        ('policy = "fastest"', "policy must be one of round_robin"),
        ("host = 127", "host must be a string"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, complaint: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["serve", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err
    assert err.count(";") == 0  # one problem, not one per character


def test_config_values_of_the_right_type_are_taken(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        'worker_url = ["127.0.0.1:8000"]\nport = 31000\ndrain_timeout_secs = 5\n'
        'upstream_read_timeout_secs = 12.5\nallow_network = ["169.254.10.0/24"]\n'
    )
    args = parse_args(["serve", "--config", str(config)])
    assert args.worker_url == ["127.0.0.1:8000"]
    assert (args.port, args.drain_timeout_secs, args.upstream_read_timeout_secs) == (31000, 5, 12.5)
    assert args.allow_network == ["169.254.10.0/24"]


def test_every_config_option_takes_its_type_default_and_help_from_gateway_config() -> None:
    _, serve = build_parser()
    actions = {action.dest: action for action in serve._actions}
    options = {option.field: option for option in config_options()}
    assert set(options) >= {"registration_concurrency", "policy", "retries", "allowed_networks"}
    defaults = GatewayConfig()
    for field in fields(GatewayConfig):
        if field.name in options:
            action = actions[options[field.name].dest]
            assert action.help == field.metadata[FLAG]["help"]
            default = action.default
            if field.default is MISSING:  # made per run (the instance id): no fixed default
                assert default is None, field.name
                continue
            assert (tuple(default) if isinstance(default, list) else default) == getattr(
                defaults, field.name
            ), field.name
            if isinstance(default, int | float) and not isinstance(default, bool):
                assert action.type is type(default), field.name
    assert tuple(actions["policy"].choices or ()) == POLICIES
    assert actions["allow_network"].metavar == "CIDR"
    args = parse_args(["serve", "--retries", "5", "--allow-network", "10.9.0.0/16"])
    built = GatewayConfig(**_config_fields(args))
    assert built == replace(
        defaults, retries=5, allowed_networks=("10.9.0.0/16",), instance_id=built.instance_id
    )


def test_the_server_options_take_their_defaults_from_the_server() -> None:
    args = parse_args(["serve"])
    limits = ServerLimits()
    assert (args.max_connections, args.write_timeout_secs) == (
        limits.max_connections,
        limits.write_timeout,
    )
    assert args.server == "http1" and args.server in SERVERS


def test_the_instance_id_is_an_option_and_random_per_start_without_it() -> None:
    named = parse_args(["serve", "--instance-id", "replica-a"])
    assert _config_fields(named)["instance_id"] == "replica-a"
    unnamed = _config_fields(parse_args(["serve"]))
    assert "instance_id" not in unnamed  # GatewayConfig makes one per start
    assert GatewayConfig(**unnamed).instance_id != GatewayConfig(**unnamed).instance_id
