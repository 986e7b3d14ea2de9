"""The runner as the gateway spawns it: nginx passes almost no environment."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from runner.protocol.messages import Stop
from runner.tools.client import Connection, wait_for_socket
from tests.conftest import FIXTURE_PLUGINS

ROOT = str(Path(__file__).resolve().parents[2])


async def test_runs_without_lang_or_home_and_keeps_non_utf8_header_bytes(sock_dir: Path) -> None:
    sock = sock_dir / "apisix-1.sock"
    # Exactly what the gateway sets; no PATH, LANG, LC_ALL or HOME.
    env = {"APISIX_LISTEN_ADDRESS": f"unix:{sock}", "APISIX_CONF_EXPIRE_TIME": "3600"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", "run", "--plugins-dir", str(FIXTURE_PLUGINS),
        "--log-level", "debug",
        env=env, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for_socket(str(sock))
        async with await Connection.open(str(sock)) as conn:
            token = await conn.prepare_conf([("test-echo-request", "")], key="route#\u00e9")
            latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # not UTF-8 on the wire
            reply = await conn.req_call(token, headers=[("x-name", latin1)], path="/\u00fc")
        assert isinstance(reply.action, Stop)
        assert b"('x-name', 'caf\\udce9')" in reply.action.body
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr
        assert b"listening on unix:" in stderr
        assert b"route#\xc3\xa9" in stderr  # debug log of the prepared route, readable
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
