"""``a6-runner bench``, the load generator, against real runners: counts, error kinds, output.

Runs are short and bounded by a call count (or a fraction of a second); nothing here
asserts a timing, only what the numbers are made of.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.tools.bench import (
    BenchConfig,
    BenchResult,
    RequestShape,
    SpawnedRunner,
    find_listener_pid,
    format_result,
    parse_conf,
    process_cpu_seconds,
    process_rss_kib,
    process_tree,
    run_bench,
    run_bench_processes,
    split_config,
)
from runner.tools.client import RunnerError, wait_for_socket
from tests.conftest import FIXTURE_PLUGINS, serving, test_config

FLOOR_SERVER = Path(__file__).resolve().parents[2] / "benchmarks" / "floor_server.py"


def bench_config(socket: str, conf: list[tuple[str, str]], **overrides: object) -> BenchConfig:
    settings: dict[str, object] = {
        "socket": socket,
        "conf": tuple(conf),
        "connections": 4,
        "requests": 200,
        "duration": 30.0,
        "warmup": 0.0,
        "verify_every": 10,
    }
    settings.update(overrides)
    return BenchConfig(**settings)  # type: ignore[arg-type]


async def test_a_bounded_run_makes_exactly_the_calls_asked_for(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        result = await run_bench(
            bench_config(config.listen, [("say", '{"body": "hi", "status": 418}')])
        )
    assert result.stopped_by == "requests"
    assert (result.calls, result.ok, result.errors) == (200, 200, {})
    assert result.first_reply == "stop: status 418, 2-byte body"
    assert result.connections == 4
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    assert result.runner_cpu_us_per_call is None  # no pid given: not measured


async def test_extra_info_is_answered_from_the_given_variables_and_body(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    conf = [
        (
            "request-info",
            json.dumps({"vars": {"x-addr": "remote_addr"}, "body_length_header": "x-len"}),
        )
    ]
    shape = RequestShape(method="POST", body_size=3000, vars=(("remote_addr", "10.1.2.3"),))
    async with serving(config):
        result = await run_bench(bench_config(config.listen, conf, shape=shape, requests=50))
    assert (result.ok, result.errors) == (50, {})
    assert result.first_reply == "rewrite: headers x-addr=10.1.2.3, x-len=3000"


async def test_the_response_phase(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    conf = [("response-rewrite", '{"status": 201, "set_headers": {"x-r": "1"}}')]
    shape = RequestShape(phase="response", header_count=1)
    async with serving(config):
        result = await run_bench(bench_config(config.listen, conf, shape=shape, requests=40))
    assert (result.ok, result.errors) == (40, {})
    assert result.first_reply == (
        "response: status 201, headers host=bench.example.com, x-r=1, body unchanged"
    )


async def test_error_frames_are_counted_by_kind(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        result = await run_bench(bench_config(config.listen, [("test-fail", "null")]))
    assert result.calls == 200
    assert result.ok == 0
    assert result.errors == {"service_unavailable": 200}
    assert "errors        200 (service_unavailable: 200)" in format_result(result)


async def test_a_time_bound_ends_the_run(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        result = await run_bench(
            bench_config(config.listen, [("say", "{}")], requests=None, duration=0.3)
        )
    assert result.stopped_by == "duration"
    assert result.calls == result.ok > 0


async def test_calls_past_the_timeout_are_dropped_and_the_connection_replaced(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        result = await run_bench(
            bench_config(
                config.listen,
                [("test-hang", "null")],
                connections=2,
                requests=None,
                duration=0.8,
                call_timeout=0.2,
            )
        )
    assert result.ok == 0
    assert set(result.errors) == {"timeout"}
    assert result.errors["timeout"] >= 2
    assert result.reconnects >= 2


async def test_prepare_conf_failure_is_raised_not_measured(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        with pytest.raises(Exception, match="bad request"):
            await run_bench(bench_config(config.listen, [("no-such-plugin", "{}")]))


async def test_a_reply_with_another_id_is_a_bad_reply(sock_dir: Path) -> None:
    # The canned-reply floor server answers every call with id 0: the connection whose
    # calls carry id 1 sees bad replies, unless ids are not checked.
    socket = str(sock_dir / "floor.sock")
    floor = await asyncio.create_subprocess_exec(sys.executable, str(FLOOR_SERVER), socket)
    try:
        await wait_for_socket(socket)
        checked = await run_bench(bench_config(socket, [], connections=2, verify_every=1))
        unchecked = await run_bench(
            bench_config(socket, [], connections=2, verify_every=1, check_id=False)
        )
    finally:
        floor.terminate()
        await floor.wait()
    assert checked.errors.get("bad_reply", 0) > 0
    assert checked.calls == 200
    assert (unchecked.ok, unchecked.errors) == (200, {})
    assert unchecked.first_reply == "pass through"


async def test_the_listener_of_a_socket_is_found(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        assert find_listener_pid(str(config.socket_path)) == os.getpid()
    assert find_listener_pid(str(config.socket_path)) is None


async def test_a_spawned_runner_reports_its_cpu_time_and_memory() -> None:
    runner = SpawnedRunner()
    await runner.start()
    try:
        result = await run_bench(
            bench_config(runner.socket, [("say", "{}")], requests=300, pid=runner.pid)
        )
    finally:
        runner.stop()
    assert (result.calls, result.errors) == (300, {})
    assert result.runner_pid == runner.pid
    assert result.runner_cpu_us_per_call is not None
    assert result.runner_cpu_us_per_call >= 0
    assert result.runner_rss_kib is not None
    assert min(result.runner_rss_kib) > 0


def test_the_command_spawns_a_runner_and_prints_json() -> None:
    got = CliRunner().invoke(
        main,
        ["bench", "-n", "300", "-c", "3", "--warmup", "0", "--json", "--conf", "[]"],
    )
    assert got.exit_code == 0, got.output
    data = json.loads(got.output)
    assert set(data) == set(BenchResult.__dataclass_fields__)
    assert (data["calls"], data["ok"], data["errors"]) == (300, 300, {})
    assert data["first_reply"] == "pass through"
    assert set(data["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert set(data["runner_rss_kib"]) == {"start", "end"}
    assert isinstance(data["runner_cpu_us_per_call"], float)
    assert data["shape"]["header_count"] == 8


def test_the_command_reads_the_conf_from_a_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"conf": [{"name": "say", "value": {"status": 403}}]}))
    got = CliRunner().invoke(
        main, ["bench", "-n", "50", "-c", "1", "--warmup", "0", "--conf", f"@{conf}"]
    )
    assert got.exit_code == 0, got.output
    assert "50 calls on 1 connection(s)" in got.output
    assert "stop: status 403" in got.output
    assert "errors        none" in got.output
    assert "runner CPU" in got.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--conf", "{not json"], "not JSON"),
        (["--conf", '[{"value": "{}"}]'], "string 'name'"),
        (["-c", "0"], "connections must be at least 1"),
        (["--method", "BREW"], "unknown method"),
        (["--var", "novalue"], "is not NAME=VALUE"),
        (["--socket", "/tmp/x.sock", "--", "--plugins-dir", "."], "RUNNER_ARGS"),
    ],
)
def test_the_command_refuses_bad_options(args: list[str], message: str) -> None:
    got = CliRunner().invoke(main, ["bench", *args])
    assert got.exit_code != 0
    assert message in got.output


def test_a_runner_that_cannot_start_is_reported() -> None:
    got = CliRunner().invoke(main, ["bench", "-n", "5", "--", "--plugins-dir", "/nonexistent"])
    assert got.exit_code != 0
    assert "/nonexistent" in got.output


def test_parse_conf_accepts_the_routes_forms() -> None:
    assert parse_conf("[]") == ()
    assert parse_conf('[{"name": "a", "value": "{\\"k\\": 1}"}]') == (("a", '{"k": 1}'),)
    assert parse_conf('{"conf": [{"name": "a", "value": {"k": 1}}]}') == (("a", '{"k": 1}'),)
    assert parse_conf('[{"name": "a"}]') == (("a", "{}"),)


async def test_a_runner_that_dies_mid_run_is_counted_not_fatal() -> None:
    runner = SpawnedRunner()
    await runner.start()
    assert runner.process is not None
    asyncio.get_running_loop().call_later(0.4, runner.process.kill)
    try:
        result = await run_bench(
            bench_config(runner.socket, [("say", "{}")], requests=None, duration=1.0)
        )
    finally:
        runner.stop()
    assert result.ok > 0
    assert result.stopped_by == "duration"
    # Calls in flight at the kill are lost with their connections; new connections fail
    # (or are refused) for the rest of the run.
    assert set(result.errors) <= {"connection_lost", "connect_failed"}
    assert result.errors.get("connect_failed", 0) > 0


FIXTURES = ["--", "--plugins-dir", str(FIXTURE_PLUGINS)]


def test_failed_calls_fail_the_command_unless_the_error_rate_allows_them() -> None:
    args = ["bench", "-n", "40", "-c", "2", "--warmup", "0", "--conf"]
    conf = '[{"name": "test-fail", "value": "null"}]'
    failed = CliRunner().invoke(main, [*args, conf, *FIXTURES])
    assert failed.exit_code == 1, failed.output
    assert "errors        40 (service_unavailable: 40)" in failed.output
    assert "40 of 40 calls failed (100%), more than --max-error-rate 0%" in failed.output
    allowed = CliRunner().invoke(main, [*args, conf, "--max-error-rate", "100", *FIXTURES])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("from_file", [False, True], ids=["text", "file"])
def test_a_real_request_body_is_answered_to_the_plugin(tmp_path: Path, from_file: bool) -> None:
    body = '{"order": 17, "items": ["a", "b"]}'
    if from_file:
        (tmp_path / "body.json").write_text(body)
    conf = json.dumps([{"name": "test-echo-vars", "value": {"names": [], "body": True}}])
    got = CliRunner().invoke(
        main,
        [
            *("bench", "-n", "20", "-c", "1", "--warmup", "0", "--method", "POST"),
            *("--body", f"@{tmp_path / 'body.json'}" if from_file else body),
            *("--conf", conf, "--json", *FIXTURES),
        ],
    )
    assert got.exit_code == 0, got.output
    data = json.loads(got.output)
    # The plugin stops with a newline and the body it read from the gateway.
    assert data["first_reply"] == f"stop: status 200, {len(body) + 1}-byte body"
    assert data["shape"]["body_size"] == len(body)


async def test_the_upstream_response_can_be_given(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    shape = RequestShape(
        phase="response",
        status=404,
        resp_headers=(("server", "upstream"), ("content-type", "text/plain")),
        resp_body_data=b"not here",
    )
    headers_conf = [("response-rewrite", '{"set_headers": {"x-r": "1"}}')]
    body_conf = [("test-resp-echo", "")]
    async with serving(config):
        headers = await run_bench(bench_config(config.listen, headers_conf, shape=shape))
        body = await run_bench(bench_config(config.listen, body_conf, shape=shape))
    assert headers.first_reply == (
        "response: status unchanged,"
        " headers server=upstream, content-type=text/plain, x-r=1, body unchanged"
    )
    echoed = b"status=404 body=b'not here' req_body=None"
    assert body.first_reply == (
        f"response: status unchanged, headers unchanged, body {len(echoed)} bytes"
    )


def test_a_missing_socket_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.sock"
    got = CliRunner().invoke(main, ["bench", "--socket", str(path), "-n", "5"])
    assert got.exit_code != 0
    assert f"no socket at {path}" in got.output


async def test_a_conf_rejected_by_a_running_runner_points_at_its_log(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        got = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            ["bench", "--socket", config.listen, "-n", "5", "--conf", '[{"name": "nope"}]'],
        )
    assert got.exit_code != 0
    assert "the runner rejected the conf at PrepareConf (runner error 0 (bad request))" in (
        got.output
    )
    assert "its log says why" in got.output


def test_cpu_and_memory_count_every_process_of_the_runner() -> None:
    # A supervisor with one worker: the worker burns CPU, the parent only waits.
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])"
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    burn += "time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", script, burn])
    try:
        for _ in range(200):
            tree = process_tree(parent.pid)
            cpu = process_cpu_seconds(parent.pid)
            if len(tree) == 2 and cpu is not None and cpu >= 0.3:
                break
            time.sleep(0.05)
        assert len(tree) == 2
        assert cpu is not None
        assert cpu >= 0.3  # the worker's time: the parent only waits
        total = process_rss_kib(parent.pid)
        worker = process_rss_kib(tree[1])
        assert total is not None
        assert worker is not None
        assert total > worker  # the parent's memory and the worker's
    finally:
        for pid in process_tree(parent.pid)[1:]:
            os.kill(pid, 9)
        parent.kill()
        parent.wait()


def test_several_client_processes_share_the_load_and_their_results_are_merged() -> None:
    got = CliRunner().invoke(
        main, ["bench", "-p", "2", "-c", "3", "-n", "301", "--warmup", "0", "--json"]
    )
    assert got.exit_code == 0, got.output
    data = json.loads(got.output)
    assert (data["processes"], data["connections"]) == (2, 3)
    assert (data["calls"], data["ok"], data["errors"]) == (301, 301, {})
    assert data["first_reply"] == "stop: status 200, 21-byte body"
    assert data["latency_ms"]["p50"] <= data["latency_ms"]["max"]
    assert isinstance(data["runner_cpu_us_per_call"], float)


def test_split_config_shares_out_connections_and_calls() -> None:
    shares = split_config(bench_config("s", [], connections=5, requests=11), 2)
    assert [(c.connections, c.requests) for c in shares] == [(3, 6), (2, 5)]
    with pytest.raises(ValueError, match="processes"):
        split_config(bench_config("s", [], connections=2), 3)


async def test_several_processes_report_a_rejected_conf_once(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        with pytest.raises(RunnerError, match="bad request"):
            await run_bench_processes(bench_config(config.listen, [("nope", "{}")]), 2)
