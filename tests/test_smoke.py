"""The shortest path through the runner: prepare, call, get an answer."""

from __future__ import annotations

from pathlib import Path

from runner.protocol.messages import Stop
from tests.conftest import connect, serving, test_config


async def test_say_plugin_answers_over_a_real_socket(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        conn = await connect(config)
        async with conn:
            token = await conn.prepare_conf([("say", '{"body": "hi", "status": 418}')])
            reply = await conn.req_call(token, id=7)
    assert reply.id == 7
    assert reply.action == Stop(status=418, headers=(), body=b"hi")
