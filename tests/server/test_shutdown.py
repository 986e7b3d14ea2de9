"""Shutdown of a real runner process while a blocking plugin is stuck in its thread."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from runner.tools.client import Connection, wait_for_socket
from tests.conftest import FIXTURE_PLUGINS


async def start_runner(sock: Path, *options: str) -> asyncio.subprocess.Process:
    """``python -m runner run`` as the gateway starts it, on ``sock``, stderr captured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APISIX_", "A6_RUNNER_"))}
    env["APISIX_LISTEN_ADDRESS"] = f"unix:{sock}"
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", "run", "--plugins-dir", str(FIXTURE_PLUGINS), *options,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_sigterm_exits_0_even_with_a_blocking_plugin_stuck(sock_dir: Path) -> None:
    sock = sock_dir / "r.sock"
    proc = await start_runner(sock)
    try:
        await wait_for_socket(str(sock))
        conn = await Connection.open(str(sock))
        token = await conn.prepare_conf([("test-block", json.dumps({"seconds": 30}))])
        call = asyncio.create_task(conn.req_call(token))
        await asyncio.sleep(0.3)  # the call is now sleeping in a worker thread
        proc.send_signal(signal.SIGTERM)
        # The gateway SIGKILLs one second after SIGTERM; 30 s is only a hang detector.
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0
        assert not sock.exists()
        assert b"still running" in stderr
        call.cancel()
        await conn.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_second_sigterm_does_not_cut_the_grace_period_short(sock_dir: Path) -> None:
    sock = sock_dir / "r.sock"
    proc = await start_runner(sock, "--shutdown-grace", "5")
    try:
        await wait_for_socket(str(sock))
        conn = await Connection.open(str(sock))
        token = await conn.prepare_conf([("test-sleep", json.dumps({"seconds": 0.5}))])
        call = asyncio.create_task(conn.req_call(token, id=5))
        await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        reply = await call  # the call in flight still gets its answer
        assert reply.id == 5
        async with asyncio.timeout(30):
            await proc.communicate()
        assert proc.returncode == 0
        assert not sock.exists()
        await conn.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
