"""The operator's endpoint of a real runner process: /metrics scraped over HTTP (TCP
loopback and a Unix socket) after calls made as the gateway makes them, with one
process and with workers (one of them killed), and /healthz, /readyz."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner.core.config import StatusAddress
from runner.protocol.messages import ErrCode, Rewrite, Stop
from runner.server.status import StatusServer
from runner.tools.client import Connection, RunnerError
from tests.server.test_process import RunnerProcess, conf, running
from tests.server.test_workers import one_connection_each, until, workers_of
from tests.server.test_workers import running as running_workers

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http_get(address: str, target: str) -> tuple[int, str]:
    """GET ``target`` from ``address`` (``host:port`` or a socket path): status, body."""
    if address.startswith("/"):
        reader, writer = await asyncio.open_unix_connection(address)
    else:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def scrape(address: str) -> Samples:
    status, text = await http_get(address, "/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


ENDPOINT_LINE = re.compile(r"metrics and health on (?:unix:)?(\S+) ")


async def endpoint(runner: RunnerProcess) -> str:
    """The address the runner says its endpoint listens on (a supervisor says so just
    after its socket appears)."""
    await until(lambda: ENDPOINT_LINE.search(runner.output) is not None, "the endpoint's line")
    match = ENDPOINT_LINE.search(runner.output)
    assert match, runner.output
    return match.group(1)


async def test_metrics_count_the_calls_made_by_rpc_outcome_and_plugin(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--metrics-listen", "127.0.0.1:0") as runner:
        address = await endpoint(runner)
        async with await Connection.open(str(sock)) as conn:
            say = await conn.prepare_conf([conf("say", body="hi")], key="route#1")
            assert await conn.prepare_conf([conf("say", body="hi")], key="route#1") == say
            rewrite = await conn.prepare_conf([conf("rewrite", set_headers={"x-a": "1"})])
            echo = await conn.prepare_conf([conf("test-echo-vars", names=["remote_addr"])])
            fail = await conn.prepare_conf([conf("test-fail")])
            passing = await conn.prepare_conf([])
            for _ in range(3):
                assert isinstance((await conn.req_call(say)).action, Stop)
            assert isinstance((await conn.req_call(rewrite)).action, Rewrite)
            await conn.req_call(echo, vars={"remote_addr": "10.0.0.7"})
            await conn.req_call(echo, vars={"remote_addr": "10.0.0.8"})
            assert (await conn.req_call(passing)).action is None
            for _ in range(2):
                with pytest.raises(RunnerError) as failed:
                    await conn.req_call(fail)
                assert failed.value.code == ErrCode.SERVICE_UNAVAILABLE
            with pytest.raises(RunnerError) as unknown:
                await conn.req_call(123456)
            assert unknown.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
            samples = await scrape(address)

    calls = "a6_runner_calls_total"
    assert value(samples, calls, rpc="prepare_conf", outcome="ok") == 6
    assert value(samples, calls, rpc="http_req_call", outcome="stop") == 5  # say x3, echo x2
    assert value(samples, calls, rpc="http_req_call", outcome="rewrite") == 1
    assert value(samples, calls, rpc="http_req_call", outcome="pass") == 1
    assert value(samples, calls, rpc="http_req_call", outcome="service_unavailable") == 2
    assert value(samples, calls, rpc="http_req_call", outcome="conf_token_not_found") == 1
    assert value(samples, "a6_runner_conf_token_not_found_total") == 1
    assert value(samples, "a6_runner_confs_prepared_total", result="new") == 5
    assert value(samples, "a6_runner_confs_prepared_total", result="reused") == 1
    hist = "a6_runner_plugin_duration_seconds_count"
    assert value(samples, hist, plugin="say", hook="on_request") == 3
    assert value(samples, hist, plugin="test-fail", hook="on_request") == 2
    assert (
        value(samples, "a6_runner_plugin_failures_total", plugin="test-fail", hook="on_request")
        == 2
    )
    assert value(samples, "a6_runner_plugin_failures_total", plugin="say", hook="on_request") == 0
    assert value(samples, "a6_runner_extra_info_total", kind="var") == 2
    assert value(samples, "a6_runner_extra_info_bytes_total", kind="var") == 2 * len("10.0.0.7")
    # The connection was open while the scrape ran.
    assert value(samples, "a6_runner_open_connections", worker="0") == 1


async def test_health_and_metrics_on_a_unix_socket_only_the_owner_may_use(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    status_sock = sock_dir / "status.sock"
    async with running(sock, "--metrics-listen", str(status_sock)) as runner:
        assert await endpoint(runner) == str(status_sock)
        assert stat.S_IMODE(status_sock.stat().st_mode) == 0o600
        assert await http_get(str(status_sock), "/healthz") == (200, "ok\n")
        assert await http_get(str(status_sock), "/readyz") == (200, "ready\n")
        assert (await http_get(str(status_sock), "/nothing"))[0] == 404
        async with await Connection.open(str(sock)) as conn:
            token = await conn.prepare_conf([conf("say")])
            await conn.req_call(token)
        samples = await scrape(str(status_sock))
        assert value(samples, "a6_runner_calls_total", rpc="http_req_call", outcome="stop") == 1
        runner.signal(signal.SIGTERM)
        assert await runner.exit_status() == 0
    assert not status_sock.exists()  # removed on the way out, like the runner's socket


async def test_readyz_says_why_the_runner_is_not_ready(sock_dir: Path) -> None:
    reasons = ["starting"]
    server = StatusServer(StatusAddress(path=sock_dir / "s.sock"), lambda: b"", lambda: reasons)
    server.start_thread()
    try:
        assert await http_get(str(sock_dir / "s.sock"), "/readyz") == (503, "starting\n")
        reasons.clear()
        assert await http_get(str(sock_dir / "s.sock"), "/readyz") == (200, "ready\n")
        # /healthz answers whatever the readiness.
        reasons.append("shutting down")
        assert await http_get(str(sock_dir / "s.sock"), "/healthz") == (200, "ok\n")
    finally:
        server.close()


async def test_an_address_other_hosts_can_reach_needs_metrics_allow_remote(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    refused = RunnerProcess(sock, "--metrics-listen", "0.0.0.0:0")
    assert await refused.exit_status() == 2
    assert "--metrics-allow-remote" in refused.output
    async with running(sock, "--metrics-listen", "0.0.0.0:0", "--metrics-allow-remote") as runner:
        port = (await endpoint(runner)).rpartition(":")[2]
        assert await http_get(f"127.0.0.1:{port}", "/healthz") == (200, "ok\n")


async def test_workers_counts_are_summed_and_a_killed_worker_is_a_restart(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running_workers(sock, "--workers", "2", "--metrics-listen", "127.0.0.1:0") as runner:
        address = await endpoint(runner)
        pids = await workers_of(runner, 2)
        async with one_connection_each(sock, pids) as conns:
            # one_connection_each made a test-pid conf and a call on each connection.
            opened = sum(1 for _ in conns)
            stops: dict[int, int] = {}
            for n, (pid, conn) in enumerate(conns.items(), start=2):
                token = await conn.prepare_conf([conf("say")])
                for _ in range(n):
                    await conn.req_call(token)
                stops[pid] = n
            expected = sum(stops.values())

            latest: Samples = {}

            async def counted() -> bool:
                nonlocal latest
                latest = await scrape(address)
                return (
                    value(
                        latest,
                        "a6_runner_plugin_duration_seconds_count",
                        plugin="say",
                        hook="on_request",
                    )
                    == expected
                )

            await until_async(counted, "every worker's calls in the sum")
            assert (
                value(latest, "a6_runner_calls_total", rpc="http_req_call", outcome="stop")
                >= expected + opened
            )
            assert (await http_get(address, "/readyz"))[0] == 200
            victim = next(iter(stops))
            os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            nonlocal latest
            latest = await scrape(address)
            return value(latest, "a6_runner_worker_restarts_total", cause="killed") == 1

        await until_async(restarted, "the killed worker counted as a restart")
        # Its calls stay in the totals: counters never go down.
        assert (
            value(
                latest, "a6_runner_plugin_duration_seconds_count", plugin="say", hook="on_request"
            )
            == expected
        )
        await until(lambda: len(set(workers_of_now(runner.pid))) == 2, "a replacement worker")


def workers_of_now(pid: int) -> set[int]:
    from tests.server.test_workers import children

    return children(pid)


async def until_async(condition: object, what: str, within: float = 20.0) -> None:
    """Poll the coroutine function ``condition`` until it returns true."""
    assert callable(condition)
    try:
        async with asyncio.timeout(within):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
