"""The command line: options, environment variables and the config file become one Config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import runner.server.lifecycle
from runner import __version__
from runner.cli import main
from runner.core.config import Config, env_var, option_name, settings
from runner.tools.client import wait_for_socket

ROOT = Path(__file__).resolve().parent.parent


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
    shipped = ROOT / "conf" / "a6-runner.toml"
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


def one_line_error(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run the command; it must fail with status 2 and a single line naming the problem."""
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_config_file_error_names_the_file_and_the_key(
    captured: list[Config], tmp_path: Path
) -> None:
    file = tmp_path / "a6.toml"
    file.write_text('[runner]\ncall_timeout = "fast"\n')
    line = one_line_error(["run", "--config", str(file)])
    assert f"{file}: call_timeout: 'fast' is not a number" in line
    assert "--call-timeout" not in line
    assert not captured


def test_a_misspelled_table_in_the_config_file_is_an_error(
    captured: list[Config], tmp_path: Path
) -> None:
    file = tmp_path / "a6.toml"
    file.write_text("[runer]\ncall_timeout = 5\n")
    assert "runer" in one_line_error(["run", "--config", str(file)])
    assert not captured


def test_a_missing_config_file_is_one_line(captured: list[Config], tmp_path: Path) -> None:
    line = one_line_error(["run"], env={"A6_RUNNER_CONFIG": str(tmp_path / "none.toml")})
    assert "none.toml" in line
    assert not captured


def test_a_toml_octal_socket_mode_is_that_mode(captured: list[Config], tmp_path: Path) -> None:
    file = tmp_path / "a6.toml"
    file.write_text("[runner]\nsocket_mode = 0o770\nplugins_dir = []\n")
    assert invoke(["run", "--config", str(file)]).exit_code == 0
    assert captured[0].socket_mode == 0o770


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--max-connections", "0"], {}, "--max-connections: must be >= 1 (got 0)"),
        ([], {"A6_RUNNER_MAX_CONFS": "0"}, "A6_RUNNER_MAX_CONFS: must be >= 1 (got 0)"),
        (["--socket-mode", "999"], {}, "--socket-mode: '999' is not an octal file mode"),
        (["--call-timeout", "fast"], {}, "--call-timeout: 'fast' is not a number"),
        ([], {"A6_RUNNER_EXAMPLES": "maybe"}, "A6_RUNNER_EXAMPLES"),
        (["--state-url", "redis://cache:six"], {}, "--state-url: state url 'redis://cache:six'"),
        ([], {"A6_RUNNER_STATE_URL": "reddis://cache"}, "A6_RUNNER_STATE_URL: state url "),
    ],
)
def test_a_value_out_of_range_names_its_setting(
    captured: list[Config], args: list[str], env: dict[str, str], named: str
) -> None:
    assert named in one_line_error(["run", *args], env)
    assert not captured


def test_warn_is_accepted_as_the_warning_level(captured: list[Config]) -> None:
    assert invoke(["run", "--log-level", "warn"]).exit_code == 0
    assert captured[0].log_level == "warning"


def test_run_help_documents_every_option_with_its_environment_variable() -> None:
    output = " ".join(invoke(["run", "--help"]).output.split())
    for text in ("--listen PATH", "default: 50.0", "default: 0766", "a6-runner config --example"):
        assert text in output
    for name, _spec in settings():
        assert f"--{option_name(name).replace('_', '-')}" in output
        assert env_var(name) in output, name
    assert "A6_RUNNER_CONFIG" in output


def test_main_help_shows_whole_command_summaries() -> None:
    output = " ".join(invoke(["--help"]).output.split("Commands:")[1].split())
    assert "..." not in output
    assert "report throughput, latency, errors and the runner's CPU time per call." in output
    assert "until SIGTERM or SIGINT; SIGHUP reloads the plugins." in output


def test_the_example_config_is_shipped_and_states_the_defaults(
    captured: list[Config], tmp_path: Path
) -> None:
    example = invoke(["config", "--example"]).output
    shipped = Path(__file__).resolve().parent.parent / "runner" / "a6-runner.toml"
    assert example == shipped.read_text()
    file = tmp_path / "example.toml"
    file.write_text(example)
    assert invoke(["run", "--config", str(file)]).exit_code == 0
    assert captured == [Config()]


def test_config_prints_a_file_that_reads_back_to_the_same_settings(
    captured: list[Config], tmp_path: Path
) -> None:
    args = ["--socket-mode", "0750", "--plugins-dir", str(tmp_path), "--log-level", "warn"]
    printed = invoke(["config", *args]).output
    file = tmp_path / "printed.toml"
    file.write_text(printed)
    assert invoke(["run", "--config", str(file)]).exit_code == 0
    assert invoke(["run", *args]).exit_code == 0
    assert captured[0] == captured[1]
    assert captured[0].socket_mode == 0o750


def test_serving_imports_no_tool_and_no_flatbuffers(tmp_path: Path) -> None:
    """``a6-runner run`` is what the gateway starts: the tools (bench, client, scaffold)
    and the FlatBuffers library are for other commands and must not load with it."""
    sock = tmp_path / "r.sock"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "APISIX_LISTEN_ADDRESS": str(sock)}
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "runner", "run"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        asyncio.run(wait_for_socket(str(sock), 20))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "runner.server.lifecycle" in imported  # the listing is real
    unwanted = sorted(
        name
        for name in imported
        if name.split(".")[0] in ("flatbuffers", "ext_plugin_proto")
        or name.startswith("runner.tools")
    )
    assert unwanted == []


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
