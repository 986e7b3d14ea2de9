"""The runner's log lines as an operator reads them: JSON lines that parse, and a
plugin's lines carrying the plugin and the route, at the configured level."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from runner.tools.client import Connection
from tests.server.test_process import RunnerProcess, conf, running
from tests.server.test_workers import until


async def call_the_logging_plugin(runner: RunnerProcess) -> None:
    async with await Connection.open(str(runner.sock)) as conn:
        token = await conn.prepare_conf([conf("test-log")], key="route#log")
        assert (await conn.req_call(token, path="/first")).action is None
    runner.signal(signal.SIGTERM)
    assert await runner.exit_status() == 0


async def test_json_lines_parse_and_a_plugins_lines_carry_plugin_and_route(
    sock_dir: Path,
) -> None:
    async with running(sock_dir / "runner.sock", "--log-format", "json") as runner:
        await call_the_logging_plugin(runner)
        lines = [json.loads(line) for line in runner.output.splitlines()]
    assert lines, runner.output
    for line in lines:
        assert {"time", "level", "process", "pid", "logger", "message"} <= set(line), line
        assert line["time"].endswith("Z")
        assert line["process"] == "a6-runner"
        assert "worker" not in line  # a single runner
    ours = [line for line in lines if line.get("plugin") == "test-log"]
    assert [(line["level"], line["message"], line["route"]) for line in ours] == [
        ("info", "info line of /first", "route#log"),
        ("warning", "warning line of /first", "route#log"),
    ]
    assert ours[0]["logger"] == "a6.plugin.test-log"
    # The standard way to log from a plugin module comes out too, at the same level.
    assert any(line["message"] == "stdlib info line of /first" for line in lines)
    assert not any("debug line" in line["message"] for line in lines)


async def test_a_plugins_lines_honour_the_level_in_text_too(sock_dir: Path) -> None:
    async with running(sock_dir / "runner.sock", "--log-level", "warning") as runner:
        await call_the_logging_plugin(runner)
        output = runner.output
    assert "info line" not in output
    (warning,) = [line for line in output.splitlines() if "warning line" in line]
    assert warning.endswith(
        "WARNING a6.plugin.test-log: warning line of /first [plugin=test-log route=route#log]"
    )


async def test_with_debug_a_plugins_debug_lines_come_out(sock_dir: Path) -> None:
    async with running(
        sock_dir / "runner.sock", "--log-level", "debug", "--log-format", "json"
    ) as runner:
        await call_the_logging_plugin(runner)
        lines = [json.loads(line) for line in runner.output.splitlines()]
    assert any(
        line["message"] == "debug line of /first" and line["route"] == "route#log" for line in lines
    )


async def test_json_lines_of_workers_name_the_worker(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2", "--log-format", "json") as runner:
        await until(lambda: runner.output.count('"serving"') == 2, "two workers serving")
        lines = [json.loads(line) for line in runner.output.splitlines()]
    workers = {line.get("worker") for line in lines}
    assert workers == {"supervisor", 1, 2}, lines
