"""A serving runner and the bench need neither ``flatbuffers`` nor ``ext_plugin_proto``:
those are the tests' reference, not a runtime need. Both run here in a process where
importing either fails."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from runner.protocol.messages import Stop
from runner.tools.client import Connection, wait_for_socket

ROOT = Path(__file__).resolve().parents[2]

# Run a6-runner's CLI with the two packages made unimportable.
BLOCKED_CLI = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("flatbuffers", "ext_plugin_proto"):
            raise ImportError(f"{name} must not be imported here")
        return None

sys.meta_path.insert(0, Blocker())
from runner.cli import main
main(sys.argv[1:], prog_name="a6-runner")
"""


def blocked_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", BLOCKED_CLI, *args]


async def test_a_serving_runner_and_the_bench_import_neither(tmp_path: Path) -> None:
    sock = tmp_path / "runner.sock"
    # Started elsewhere than the repository, where ext_plugin_proto/ is not on the path.
    runner = await asyncio.create_subprocess_exec(
        *blocked_cli("run", "--listen", f"unix:{sock}", "--log-level", "warning"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_for_socket(str(sock), 20)
        async with await Connection.open(str(sock)) as conn:
            token = await conn.prepare_conf([("say", json.dumps({"body": "hi"}))])
            reply = await conn.req_call(token)
        assert reply.action == Stop(200, (), b"hi")
        bench = await asyncio.to_thread(
            subprocess.run,
            blocked_cli("bench", "--socket", str(sock), "-n", "20", "-c", "2", "--warmup", "0"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bench.returncode == 0, bench.stdout + bench.stderr
        assert "20 calls on 2 connection(s)" in bench.stdout
    finally:
        runner.terminate()
        output, _ = await runner.communicate()
    assert b"must not be imported" not in output, output.decode()
