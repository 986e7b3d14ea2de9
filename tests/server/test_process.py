"""The runner as the gateway runs it: a process started with APISIX_LISTEN_ADDRESS, stopped
with SIGTERM (SIGKILL a second later), killed and restarted on the same path, started
twice, started where something else sits at the path, and fuzzed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner import __version__
from runner.protocol.messages import ErrCode, Stop
from runner.tools.client import Connection, ProtocolViolation, RunnerError, wait_for_socket
from tests.conftest import FIXTURE_PLUGINS
from tests.server.test_fuzz import FUZZ_SEED, run_fuzzer

ROOT = Path(__file__).resolve().parents[2]

# Bounds for waiting on a process; generous, since CI machines are shared.
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0


def conf(name: str, **config: object) -> tuple[str, str]:
    return name, json.dumps(config)


class RunnerProcess:
    """``python -m runner run`` with the gateway's environment, and nothing else in it
    (no LANG, LC_ALL or HOME: nginx hides them unless declared)."""

    def __init__(
        self,
        sock: Path,
        *args: str,
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.sock = sock
        self.log_path = sock.parent / f"runner-{id(self)}.log"
        command: list[str] = [sys.executable, "-m", "runner", "run", *args]
        if nofile is not None:
            # Start under a given open-file limit, as a service manager would.
            command = [
                sys.executable,
                "-c",
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, {nofile!r}); "
                "os.execv(sys.executable, sys.argv[1:])",
                *command,
            ]
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "APISIX_LISTEN_ADDRESS": f"unix:{sock}",
            "APISIX_CONF_EXPIRE_TIME": "3600",
            "A6_RUNNER_PLUGINS_DIR": str(FIXTURE_PLUGINS),
            "A6_RUNNER_EXAMPLES": "true",  # the tests call say, beside the fixtures
            **(env or {}),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self) -> None:
        try:
            await wait_for_socket(str(self.sock), START_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"the runner did not start:\n{self.output}") from None

    async def exit_status(self) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the runner did not exit:\n{self.output}") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def running(sock: Path, *args: str, **kwargs: object) -> AsyncIterator[RunnerProcess]:
    runner = RunnerProcess(sock, *args, **kwargs)  # type: ignore[arg-type]
    try:
        await runner.ready()
        yield runner
    finally:
        runner.kill()


async def say(sock: Path, body: str) -> tuple[Connection, int]:
    conn = await Connection.open(str(sock))
    return conn, await conn.prepare_conf([conf("say", body=body)])


# -------------------------------------------------------------------------- SIGTERM


async def test_sigterm_lets_a_call_in_flight_finish_then_exits_0_without_its_socket(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock) as runner:
        async with (
            await Connection.open(str(sock)) as conn,
            await Connection.open(str(sock)) as idle,
        ):
            # The default grace (0.7 s) ends before the gateway's SIGKILL, 1 s after SIGTERM.
            token = await conn.prepare_conf([conf("test-sleep", seconds=0.3)])
            call = asyncio.create_task(conn.req_call(token, id=21))
            await asyncio.sleep(0.1)
            runner.signal(signal.SIGTERM)
            reply = await call
            assert reply.id == 21  # the call completed
            assert reply.action is None
            assert await idle._reader.read() == b""  # idle connections are closed
        assert await runner.exit_status() == 0
    assert not sock.exists()
    assert "shutting down" in runner.output
    assert "stopped" in runner.output


async def test_a_call_outlasting_the_grace_is_cut_and_the_runner_still_exits_0(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--shutdown-grace", "0.2") as runner:
        async with await Connection.open(str(sock)) as conn:
            token = await conn.prepare_conf([conf("test-hang")])
            call = asyncio.create_task(conn.req_call(token))
            await asyncio.sleep(0.1)
            runner.signal(signal.SIGTERM)
            # The gateway sees a closed connection (a 503), not a hang to its 60 s timeout.
            with pytest.raises(Exception, match="closed the connection"):
                await call
        assert await runner.exit_status() == 0
    assert not sock.exists()


async def test_sigterm_with_a_blocking_plugin_stuck_in_its_thread_still_exits(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock) as runner:
        async with await Connection.open(str(sock)) as conn:
            token = await conn.prepare_conf([conf("test-blocking-hang", seconds=30)])
            call = asyncio.create_task(conn.req_call(token))
            await asyncio.sleep(0.2)
            runner.signal(signal.SIGTERM)
            with pytest.raises(Exception, match="closed the connection"):
                await call
        # A thread the runner cannot stop must not keep it alive past the gateway's patience.
        assert await runner.exit_status() == 0
    assert not sock.exists()


# ------------------------------------------------------------- SIGKILL and restart


async def test_after_sigkill_a_restart_on_the_same_path_serves_and_old_tokens_are_unknown(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock) as first:
        old: list[int] = []
        async with await Connection.open(str(sock)) as conn:
            for i in range(50):
                old.append(await conn.prepare_conf([conf("say", body=f"old {i}")]))
        first.signal(signal.SIGKILL)
        assert await first.exit_status() == -signal.SIGKILL
    assert sock.exists()  # what a killed runner leaves behind

    async with running(sock) as second, await Connection.open(str(sock)) as conn:
        new = [await conn.prepare_conf([conf("say", body=f"new {i}")]) for i in range(50)]
        assert not set(new) & set(old)
        # What the gateway still caches from the first life must not select a conf
        # of the second: it is unknown, so the gateway prepares again.
        for token in old:
            with pytest.raises(RunnerError) as info:
                await conn.req_call(token)
            assert info.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
        for i, token in enumerate(new):
            reply = await conn.req_call(token)
            assert reply.action == Stop(200, (), f"new {i}".encode())
    assert f"removed the stale socket file {sock}" in second.output


# --------------------------------------------------------------- refusing to start


async def test_a_second_runner_on_a_live_socket_refuses_to_start(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock) as first:
        conn, token = await say(sock, "first")
        async with conn:
            inode = sock.stat().st_ino
            second = RunnerProcess(sock)
            status = await second.exit_status()
            assert status not in (0, None)
            assert f"cannot start: another process is already listening on {sock}" in second.output
            # The first runner is untouched: same socket file, same confs, same connection.
            assert sock.stat().st_ino == inode
            assert (await conn.req_call(token)).action == Stop(200, (), b"first")
        assert first.proc.poll() is None


async def test_a_regular_file_at_the_path_is_not_deleted(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    sock.write_text("someone's data")
    runner = RunnerProcess(sock)
    assert await runner.exit_status() == 1
    assert f"{sock} exists and is not a socket; refusing to replace it" in runner.output
    assert sock.read_text() == "someone's data"


async def test_a_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()
    async with running(sock):
        conn, token = await say(sock, "fresh")
        async with conn:
            assert (await conn.req_call(token)).action == Stop(200, (), b"fresh")


@pytest.mark.parametrize("address", ["127.0.0.1:47123", "tcp://127.0.0.1:47123"])
async def test_a_network_address_is_refused_and_nothing_listens(
    sock_dir: Path, address: str
) -> None:
    runner = RunnerProcess(sock_dir / "unused.sock", env={"APISIX_LISTEN_ADDRESS": address})
    assert await runner.exit_status() == 2
    assert "never listens on a network address" in runner.output
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", 47123)) != 0


# ----------------------------------------------------------------- open-file limit


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
async def test_the_runner_raises_its_own_open_file_limit(sock_dir: Path) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1064:
        pytest.skip("the hard open-file limit is too low to raise the soft one to 1064")
    sock = sock_dir / "runner.sock"
    async with running(sock, "--max-connections", "1000", nofile=(128, hard)) as runner:
        assert _soft_nofile(runner.pid) == 1064  # max_connections + 64 for the rest


async def test_under_a_hard_limit_too_low_the_runner_warns_and_outlives_running_out(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, nofile=(48, 48)) as runner:
        assert "open-file limit is 48 (hard limit 48), below the 4160" in runner.output
        # More connections than descriptors: the extra ones wait in the kernel's queue.
        held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(80)]
        try:
            for s in held:
                s.connect(str(sock))
            await asyncio.sleep(0.3)
        finally:
            for s in held:
                s.close()
        # While it is out of descriptors, libuv sheds connections (accepts and closes
        # them); once the held ones are gone, the runner serves as before.
        async with asyncio.timeout(10):
            while True:
                try:
                    conn, token = await say(sock, "recovered")
                    break
                except (ProtocolViolation, OSError):
                    await asyncio.sleep(0.1)
        async with conn:
            assert (await conn.req_call(token)).action == Stop(200, (), b"recovered")
        assert runner.proc.poll() is None


# --------------------------------------------------------------------------- fuzzed


async def test_the_process_survives_the_socket_fuzzer(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    limit = 64 * 1024
    env = {"A6_RUNNER_MAX_FRAME_SIZE": str(limit), "A6_RUNNER_CALL_TIMEOUT": "5"}
    async with running(sock, env=env) as runner:
        report = await run_fuzzer(str(sock), FUZZ_SEED + 1, 150, limit)
        assert sum(report.outcomes.values()) == 150
        assert runner.proc.poll() is None
        conn, token = await say(sock, "after the storm")
        async with conn:
            assert (await conn.req_call(token)).action == Stop(200, (), b"after the storm")
        runner.signal(signal.SIGTERM)
        assert await runner.exit_status() == 0
    # One line per event: nothing the fuzzer sent produced a traceback.
    assert "Traceback" not in runner.output


# ------------------------------------------------------------------------- SIGHUP

HUP_PLUGIN = """
from runner.plugin import Plugin, Request


class Hup(Plugin[None]):
    name = "hup"

    def on_request(self, request: Request) -> None:
        request.stop(200, {body!r})
"""


def write_hup_plugin(directory: Path, source: str) -> None:
    (directory / "hup.py").write_text(source)


async def until_logged(runner: RunnerProcess, text: str) -> None:
    async with asyncio.timeout(START_TIMEOUT):
        while text not in runner.output:  # noqa: ASYNC110 - the log is a file
            await asyncio.sleep(0.02)


async def hup_answer(sock: Path) -> bytes:
    async with await Connection.open(str(sock)) as conn:
        reply = await conn.req_call(await conn.prepare_conf([("hup", "")]))
    assert isinstance(reply.action, Stop)
    return reply.action.body


async def test_sighup_reloads_the_plugins_and_a_failed_reload_keeps_the_old_ones(
    sock_dir: Path, tmp_path: Path
) -> None:
    plugins = tmp_path / "hup_plugins"
    plugins.mkdir()
    write_hup_plugin(plugins, HUP_PLUGIN.format(body="v1"))
    sock = sock_dir / "runner.sock"
    env = {"A6_RUNNER_PLUGINS_DIR": str(plugins)}
    async with running(sock, "--no-examples", env=env) as runner:
        assert await hup_answer(sock) == b"v1"
        assert f"a6-runner {__version__} listening on unix:{sock}" in runner.output
        # Another size: a bytecode cache written within the same second as the edit
        # would otherwise look current.
        write_hup_plugin(plugins, HUP_PLUGIN.format(body="second"))
        runner.signal(signal.SIGHUP)
        await until_logged(runner, "reloaded plugins")
        assert await hup_answer(sock) == b"second"

        write_hup_plugin(plugins, "def broken(:\n")
        runner.signal(signal.SIGHUP)
        await until_logged(runner, "the previous plugins keep serving")
        assert runner.proc.poll() is None
        assert await hup_answer(sock) == b"second"

        runner.signal(signal.SIGTERM)
        assert await runner.exit_status() == 0
    assert not sock.exists()
    reload_lines = [line for line in runner.output.splitlines() if "reload" in line]
    assert len(reload_lines) == 2, runner.output


# -------------------------------------------------------------- start-up failures


def listening_at(sock_dir: Path, path: Path) -> RunnerProcess:
    """A runner told by the gateway to listen at ``path`` (its log stays in ``sock_dir``)."""
    return RunnerProcess(sock_dir / "unused.sock", env={"APISIX_LISTEN_ADDRESS": f"unix:{path}"})


def startup_failure(runner: RunnerProcess, status: int) -> str:
    """The runner's whole output, which must be one line, after it exited with ``status``.

    (But for the line saying it removed the working directory of a runner that was
    killed: tests running beside this one kill runners on purpose, and the next runner
    to start, this one, cleans up after them.)"""
    lines = [line for line in runner.output.splitlines() if " a6.tmpdirs: removed " not in line]
    assert len(lines) == 1, runner.output
    assert runner.proc.returncode == status
    return lines[0]


async def test_a_regular_file_as_the_socket_directory_is_one_line(sock_dir: Path) -> None:
    (sock_dir / "afile").write_text("")
    runner = listening_at(sock_dir, sock_dir / "afile" / "x.sock")
    assert await runner.exit_status() == 1
    assert "afile: it is not a directory" in startup_failure(runner, 1)


async def test_a_socket_path_too_long_for_unix_sockets_is_one_line(sock_dir: Path) -> None:
    runner = listening_at(sock_dir, sock_dir / ("x" * 110) / "x.sock")
    assert await runner.exit_status() == 2
    assert "a Unix socket path holds at most 107" in startup_failure(runner, 2)


async def test_a_config_file_error_is_one_line_naming_the_file(sock_dir: Path) -> None:
    config = sock_dir / "a6.toml"
    config.write_text('[runner]\ncall_timeout = "fast"\n')
    runner = RunnerProcess(sock_dir / "runner.sock", "--config", str(config))
    assert await runner.exit_status() == 2
    assert f"{config}: call_timeout: 'fast' is not a number" in startup_failure(runner, 2)


@pytest.mark.parametrize("where", ["/sys/a6-runner-test.sock", "/sys/a6-runner-test/x.sock"])
async def test_a_place_the_runner_may_not_write_is_one_line(sock_dir: Path, where: str) -> None:
    # sysfs refuses new files even to root, so this fails the same for every user.
    runner = listening_at(sock_dir, Path(where))
    assert await runner.exit_status() == 1
    line = startup_failure(runner, 1)
    assert "Operation not permitted" in line or "Permission denied" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may use any directory")
@pytest.mark.parametrize("where", ["locked/x.sock", "locked/sub/x.sock"])
async def test_a_directory_the_runner_may_not_use_is_one_line(sock_dir: Path, where: str) -> None:
    (sock_dir / "locked").mkdir(mode=0o000)
    try:
        runner = listening_at(sock_dir, sock_dir / where)
        assert await runner.exit_status() == 1
        assert "Permission denied" in startup_failure(runner, 1)
    finally:
        (sock_dir / "locked").chmod(0o700)


async def test_a_toml_octal_socket_mode_gives_the_socket_that_mode(sock_dir: Path) -> None:
    config = sock_dir / "a6.toml"
    config.write_text("[runner]\nsocket_mode = 0o770\n")
    sock = sock_dir / "runner.sock"
    async with running(sock, "--config", str(config)):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o770
