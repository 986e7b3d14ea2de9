"""The command line: options, environment variables and the config file become one Config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import runner.server.lifecycle
from runner import __version__
from runner.cli import main
from runner.core.config import Config


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replace the server with a recorder of the Config it would have run with."""
    configs: list[Config] = []

    def fake_run(config: Config) -> int:
        configs.append(config)
        return 0

    monkeypatch.setattr(runner.server.lifecycle, "run", fake_run)
    for var in ("APISIX_LISTEN_ADDRESS", "APISIX_CONF_EXPIRE_TIME", "A6_RUNNER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return configs


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_defaults_serve_the_debug_socket(captured: list[Config]) -> None:
    assert invoke(["run"]).exit_code == 0
    (config,) = captured
    assert config == Config()
    assert str(config.socket_path) == "/tmp/runner.sock"
    assert config.socket_mode == 0o766


def test_the_gateway_environment_is_honoured(captured: list[Config], tmp_path: Path) -> None:
    env = {
        "APISIX_LISTEN_ADDRESS": "unix:/run/apisix-123.sock",
        "APISIX_CONF_EXPIRE_TIME": "7200",
        "A6_RUNNER_PLUGINS_DIR": f"{tmp_path}:{tmp_path}",
    }
    assert invoke(["run"], env).exit_code == 0
    (config,) = captured
    assert config.socket_path == Path("/run/apisix-123.sock")
    assert config.conf_expire_time == 7200
    assert config.conf_ttl == 7500
    assert config.plugin_dirs == (tmp_path, tmp_path)


def test_options_beat_environment_which_beats_the_config_file(
    captured: list[Config], tmp_path: Path
) -> None:
    file = tmp_path / "a6.toml"
    file.write_text(
        '[runner]\nlisten = "/from/file.sock"\ncall_timeout = 5\nlog_level = "debug"\n'
        'socket_mode = "0770"\nmax_connections = 10\n'
    )
    env = {"A6_RUNNER_CALL_TIMEOUT": "7"}
    result = invoke(["run", "--config", str(file), "--max-connections", "20"], env)
    assert result.exit_code == 0
    (config,) = captured
    assert config.listen == "/from/file.sock"
    assert config.call_timeout == 7
    assert config.log_level == "debug"
    assert config.socket_mode == 0o770
    assert config.max_connections == 20


def test_the_shipped_config_file_is_valid_and_states_the_defaults(captured: list[Config]) -> None:
    shipped = Path(__file__).resolve().parent.parent / "conf" / "a6-runner.toml"
    assert invoke(["run", "--config", str(shipped)]).exit_code == 0
    assert captured == [Config()]


def test_a_typo_in_the_config_file_is_an_error(captured: list[Config], tmp_path: Path) -> None:
    file = tmp_path / "a6.toml"
    file.write_text("[runner]\ncall_timout = 5\n")
    result = CliRunner().invoke(main, ["run", "--config", str(file)])
    assert result.exit_code == 2
    assert "call_timout" in result.output
    assert not captured


def test_a_bad_socket_mode_is_an_error(captured: list[Config]) -> None:
    result = CliRunner().invoke(main, ["run", "--socket-mode", "rwx"])
    assert result.exit_code == 2
    assert "octal" in result.output


def test_run_help_documents_every_option_with_its_environment_variable() -> None:
    result = invoke(["run", "--help"])
    for text in (
        "--listen",
        "APISIX_LISTEN_ADDRESS",
        "--plugins-dir",
        "A6_RUNNER_PLUGINS_DIR",
        "--call-timeout",
        "default: 50.0",
        "--socket-group",
    ):
        assert text in result.output


def test_workers_come_from_the_option_the_environment_or_the_config_file(
    captured: list[Config], tmp_path: Path
) -> None:
    file = tmp_path / "a6.toml"
    file.write_text("[runner]\nworkers = 2\n")
    assert invoke(["run", "--workers", "3"]).exit_code == 0
    assert invoke(["run"], {"A6_RUNNER_WORKERS": "auto"}).exit_code == 0
    assert invoke(["run", "--config", str(file)]).exit_code == 0
    # auto: the CPUs this process may run on, not all the machine has.
    assert [c.workers for c in captured] == [3, len(os.sched_getaffinity(0)), 2]


@pytest.mark.parametrize("value", ["0", "-2", "many", ""])
def test_a_bad_number_of_workers_is_an_error(captured: list[Config], value: str) -> None:
    result = CliRunner().invoke(main, ["run", "--workers", value])
    assert result.exit_code == 2
    assert "is not a number of workers" in result.output
    assert not captured
