"""Hot reload: changed plugin code serves without a restart; broken code never does."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.registry import load_registry
from runner.protocol.messages import ErrCode, Stop
from runner.server.reload import Reloader
from runner.tools.client import Connection, RunnerError, wait_for_socket
from tests.conftest import connect, serving

PLUGIN = """
from __future__ import annotations

from dataclasses import dataclass, field

from runner.plugin import Plugin, Request


@dataclass(frozen=True)
class Style:
    shout: bool = False


@dataclass(frozen=True)
class HotConfig:
    style: Style = field(default_factory=Style)


class Hot(Plugin[HotConfig]):
    name = "hot"

    def on_request(self, request: Request) -> None:
        text = {body!r}
        request.stop(200, text.upper() if self.config.style.shout else text)
"""


def write_plugin(directory: Path, body: str, name: str = "hot.py") -> None:
    path = directory / name
    path.write_text(textwrap.dedent(PLUGIN).format(body=body))
    bump_mtime(path)


def bump_mtime(path: Path) -> None:
    # Two writes within the filesystem's timestamp granularity must still look changed.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hot_plugins"
    directory.mkdir()
    write_plugin(directory, "v1")
    return directory


def reload_config(sock_dir: Path, plugin_dir: Path) -> Config:
    return Config(listen=f"unix:{sock_dir / 'runner.sock'}", plugin_dirs=(plugin_dir,))


def reloader_for(config: Config, dispatcher: Dispatcher) -> Reloader:
    return Reloader(config.plugin_dirs, dispatcher, lambda: load_registry(config))


async def eventually(condition: Callable[[], bool]) -> bool:
    for _ in range(500):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


async def answer(conn: Connection, token: int) -> bytes:
    reply = await conn.req_call(token)
    assert isinstance(reply.action, Stop)
    return reply.action.body


async def test_a_changed_module_serves_after_the_gateway_re_prepares(
    sock_dir: Path, plugin_dir: Path
) -> None:
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        token = await conn.prepare_conf([("hot", "{}")])
        assert await answer(conn, token) == b"v1"
        assert not reloader.check_once()  # nothing changed

        write_plugin(plugin_dir, "v2")
        assert reloader.check_once()

        # The old conf is retired: the gateway hears CONF_TOKEN_NOT_FOUND and re-prepares.
        with pytest.raises(RunnerError) as info:
            await conn.req_call(token)
        assert info.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
        token = await conn.prepare_conf([("hot", '{"style": {"shout": true}}')])
        assert await answer(conn, token) == b"V2"


async def test_an_edit_within_the_same_second_and_of_the_same_size_is_not_missed(
    sock_dir: Path, plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bytecode caches compare whole-second mtimes and sizes: they would serve v1 again.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = plugin_dir / "hot.py"
    second = path.stat().st_mtime_ns // 1_000_000_000 * 1_000_000_000
    os.utime(path, ns=(second + 100, second + 100))
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        path.write_text(path.read_text().replace("'v1'", "'v2'"))
        os.utime(path, ns=(second + 200, second + 200))
        assert reloader.check_once()
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"v2"


async def test_a_module_that_fails_to_import_is_reported_and_the_old_one_keeps_serving(
    sock_dir: Path, plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        token = await conn.prepare_conf([("hot", "{}")])

        (plugin_dir / "hot.py").write_text("def broken(:\n")
        bump_mtime(plugin_dir / "hot.py")
        with caplog.at_level(logging.ERROR):
            assert not reloader.check_once()
        # One line, from the reloader, for one failed reload.
        [line] = [r.getMessage() for r in caplog.records]
        assert "hot.py failed, the previous plugins keep serving" in line
        assert "SyntaxError" in line

        # Prepared confs stay; new PrepareConfs get the old code, nested config types
        # included (they are resolved through the module the old code came from).
        assert await answer(conn, token) == b"v1"
        shouting = await conn.prepare_conf([("hot", '{"style": {"shout": true}}')])
        assert await answer(conn, shouting) == b"V1"
        assert not reloader.check_once()  # the same broken file is not retried

        write_plugin(plugin_dir, "v3")
        assert reloader.check_once()
        token = await conn.prepare_conf([("hot", "{}")])
        assert await answer(conn, token) == b"v3"


async def test_a_module_that_raises_on_import_keeps_the_old_one(
    sock_dir: Path, plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        (plugin_dir / "other.py").write_text("raise RuntimeError('no database')\n")
        with caplog.at_level(logging.ERROR, logger="a6.reload"):
            assert not reloader.check_once()
        assert "RuntimeError: no database" in caplog.text
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"v1"


async def test_two_plugins_with_one_name_keep_the_old_ones(
    sock_dir: Path, plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        write_plugin(plugin_dir, "copy", name="hot_copy.py")
        with caplog.at_level(logging.ERROR, logger="a6.reload"):
            assert not reloader.check_once()
        assert "two plugins are named 'hot'" in caplog.text
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"v1"


async def test_a_changed_helper_module_is_imported_again_with_its_plugin(
    sock_dir: Path, plugin_dir: Path
) -> None:
    (plugin_dir / "hot_helper.py").write_text("GREETING = 'hello'\n")
    (plugin_dir / "hot.py").write_text(
        textwrap.dedent("""
        from .hot_helper import GREETING
        from runner.plugin import Plugin, Request

        class Hot(Plugin[None]):
            name = "hot"

            def on_request(self, request: Request) -> None:
                request.stop(200, GREETING)
        """)
    )
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"hello"
        (plugin_dir / "hot_helper.py").write_text("GREETING = 'bonjour'\n")
        bump_mtime(plugin_dir / "hot_helper.py")
        assert reloader.check_once()
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"bonjour"


async def test_reload_now_imports_again_without_a_change_and_keeps_the_old_modules(
    sock_dir: Path, plugin_dir: Path
) -> None:
    # What SIGHUP asks for: e.g. after a `pip install` that the watcher cannot see.
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        old = server.dispatcher.registry.get("hot")
        assert old is not None
        assert reloader.reload_now()
        new = server.dispatcher.registry.get("hot")
        assert new is not None
        assert new is not old
        # The new version is a module of its own; the old one is left as it was.
        assert new.__module__ != old.__module__
        assert sys.modules[old.__module__].Hot is old
        assert not reloader.check_once()  # reload_now saw the files as they are
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"v1"


async def test_a_deleted_plugin_is_gone_after_reload(sock_dir: Path, plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "other", name="other.py")
    (plugin_dir / "other.py").write_text(
        (plugin_dir / "other.py").read_text().replace('name = "hot"', 'name = "other"')
    )
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        assert await answer(conn, await conn.prepare_conf([("other", "{}")])) == b"other"
        (plugin_dir / "other.py").unlink()
        assert reloader.check_once()
        with pytest.raises(RunnerError) as info:
            await conn.prepare_conf([("other", "{}")])
        assert info.value.code == ErrCode.BAD_REQUEST


async def test_tests_next_to_the_plugins_do_not_trigger_a_reload(
    sock_dir: Path, plugin_dir: Path
) -> None:
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server:
        reloader = reloader_for(config, server.dispatcher)
        (plugin_dir / "test_hot.py").write_text("def test_x() -> None: ...\n")
        (plugin_dir / "notes.txt").write_text("not code\n")
        assert not reloader.check_once()


async def test_a_call_in_flight_finishes_with_the_code_it_started_with(
    sock_dir: Path, plugin_dir: Path
) -> None:
    entered, go = plugin_dir.parent / "entered", plugin_dir.parent / "go"
    (plugin_dir / "hot.py").write_text(
        textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from runner.plugin import Plugin, Request

        class Hot(Plugin[None]):
            name = "hot"

            async def on_request(self, request: Request) -> None:
                Path({str(entered)!r}).touch()
                while not Path({str(go)!r}).exists():
                    await asyncio.sleep(0.01)
                request.stop(200, "old code")
        """)
    )
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server, await connect(config) as conn:
        reloader = reloader_for(config, server.dispatcher)
        in_flight = asyncio.create_task(conn.req_call(await conn.prepare_conf([("hot", "{}")])))
        assert await eventually(entered.exists)
        write_plugin(plugin_dir, "new code")
        assert reloader.check_once()
        go.touch()
        reply = await in_flight
        assert isinstance(reply.action, Stop)
        assert reply.action.body == b"old code"
        assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"new code"


async def test_the_reloader_task_polls_on_its_own(sock_dir: Path, plugin_dir: Path) -> None:
    config = reload_config(sock_dir, plugin_dir)
    async with serving(config) as server:
        reloader = Reloader(
            config.plugin_dirs, server.dispatcher, lambda: load_registry(config), interval=0.01
        )
        task = asyncio.create_task(reloader.run())
        try:
            before = server.dispatcher.registry
            write_plugin(plugin_dir, "v2")
            assert await eventually(lambda: server.dispatcher.registry is not before)
        finally:
            task.cancel()


def test_run_with_reload_serves_an_edited_plugin_without_a_restart(
    sock_dir: Path, plugin_dir: Path
) -> None:
    """The whole path a plugin author takes: ``a6-runner run --reload``, edit, call."""
    sock = sock_dir / "cli.sock"
    env = {**os.environ, "A6_RUNNER_LOG_LEVEL": "info"}
    env.pop("APISIX_LISTEN_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "run", "--listen", str(sock), "--reload",
         "--plugins-dir", str(plugin_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip

    async def drive() -> None:
        await wait_for_socket(str(sock))
        async with await Connection.open(str(sock)) as conn:
            assert await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"v1"
            write_plugin(plugin_dir, "v2")
            async with asyncio.timeout(10):
                while True:
                    try:
                        if await answer(conn, await conn.prepare_conf([("hot", "{}")])) == b"v2":
                            return
                    except RunnerError:
                        pass
                    await asyncio.sleep(0.05)

    try:
        asyncio.run(drive())
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
    assert "reload: watching" in output
    assert "reloaded plugins after a change to hot.py" in output


def test_the_reloader_watches_packages_but_not_other_subdirectories(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "util.py").write_text("")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "site.py").write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "script.py").write_text("")
    (tmp_path / "plugin.py").write_text("")
    dispatcher = Dispatcher.__new__(Dispatcher)  # never used: nothing changes
    watched = Reloader([tmp_path], dispatcher, lambda: load_registry(Config())).scan()
    root = tmp_path.resolve()
    assert sorted(Path(p).relative_to(root).as_posix() for p in watched) == [
        "pkg/__init__.py",
        "pkg/util.py",
        "plugin.py",
    ]
