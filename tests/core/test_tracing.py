"""Tracing with the SDK's in-memory exporter: a call's span continues the request's
traceparent, each plugin that ran is a child span with its outcome, and the ExtraInfo
queries are events. Runs a real runner in this process over its socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

pytest.importorskip(
    "opentelemetry.sdk", reason="the otel extra is not installed: pip install -e '.[test,otel]'"
)

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from runner.core.registry import load_registry
from runner.core.tracing import CallTracer
from runner.protocol.messages import ErrCode, Rewrite, Stop
from runner.server.lifecycle import build_dispatcher
from runner.server.listener import RunnerServer
from runner.tools.client import Connection, RunnerError
from tests.conftest import test_config
from tests.server.test_process import ROOT, conf

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@asynccontextmanager
async def traced_runner(sock_dir: Path) -> AsyncIterator[tuple[Connection, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = test_config(sock_dir)
    dispatcher = build_dispatcher(config, load_registry(config), tracer=CallTracer(provider))
    server = RunnerServer(config, dispatcher)
    await server.start()
    try:
        async with await Connection.open(config.listen) as conn:
            yield conn, exporter
    finally:
        await server.stop()
        assert dispatcher.executor is not None
        dispatcher.executor.shutdown(wait=False, cancel_futures=True)


def call_span(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == "a6-runner http_req_call"]
    return found


def children_of(parent: ReadableSpan, spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_call_continues_the_requests_trace_with_a_span_per_plugin(sock_dir: Path) -> None:
    async with traced_runner(sock_dir) as (conn, exporter):
        token = await conn.prepare_conf(
            [
                conf("rewrite", set_headers={"x-a": "1"}),
                conf("test-echo-vars", names=["remote_addr", "missing"]),
                conf("say"),  # after a Stop: never runs
            ],
            key="route#7",
        )
        reply = await conn.req_call(
            token, headers=[("Traceparent", TRACEPARENT)], vars={"remote_addr": "10.1.2.3"}
        )
        assert isinstance(reply.action, Stop)
        spans = exporter.get_finished_spans()

    call = call_span(spans)
    assert call.context is not None
    assert call.parent is not None
    assert call.context.trace_id == int(TRACE_ID, 16)
    assert call.parent.span_id == int(PARENT_ID, 16)
    assert call.attributes is not None
    assert call.attributes["a6.route"] == "route#7"
    assert call.attributes["a6.outcome"] == "stop"
    plugins = children_of(call, spans)
    assert [(s.name, (s.attributes or {})["a6.plugin.outcome"]) for s in plugins] == [
        ("rewrite", "continue"),
        ("test-echo-vars", "stop"),
    ]
    events = [(e.name, dict(e.attributes or {})) for e in call.events]
    assert events == [
        ("extra_info.query", {"a6.extra_info.kind": "var", "a6.extra_info.name": "remote_addr"}),
        (
            "extra_info.answer",
            {
                "a6.extra_info.kind": "var",
                "a6.extra_info.name": "remote_addr",
                "a6.extra_info.bytes": len("10.1.2.3"),
            },
        ),
        ("extra_info.query", {"a6.extra_info.kind": "var", "a6.extra_info.name": "missing"}),
        (
            "extra_info.answer",
            {
                "a6.extra_info.kind": "var",
                "a6.extra_info.name": "missing",
                "a6.extra_info.bytes": -1,
            },
        ),
    ]


async def test_a_failing_plugin_marks_its_span_and_the_call_as_errors(sock_dir: Path) -> None:
    async with traced_runner(sock_dir) as (conn, exporter):
        token = await conn.prepare_conf(
            [conf("rewrite", set_headers={"x-a": "1"}), conf("test-fail")]
        )
        with pytest.raises(RunnerError) as failed:
            await conn.req_call(token)
        assert failed.value.code == ErrCode.SERVICE_UNAVAILABLE
        spans = exporter.get_finished_spans()
    call = call_span(spans)
    # No traceparent: the call starts a trace of its own.
    assert call.parent is None
    assert call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["a6.outcome"] == "service_unavailable"
    failing = [s for s in children_of(call, spans) if s.name == "test-fail"]
    assert [(s.attributes or {})["a6.plugin.outcome"] for s in failing] == ["error"]
    assert failing[0].status.status_code is StatusCode.ERROR


async def test_a_rewrite_is_the_calls_outcome(sock_dir: Path) -> None:
    async with traced_runner(sock_dir) as (conn, exporter):
        token = await conn.prepare_conf([conf("rewrite", set_headers={"x-a": "1"})])
        assert isinstance((await conn.req_call(token)).action, Rewrite)
        call = call_span(exporter.get_finished_spans())
    assert (call.attributes or {})["a6.outcome"] == "rewrite"


def test_without_the_options_nothing_of_opentelemetry_or_prometheus_is_imported() -> None:
    code = (
        "import sys\n"
        "import runner.cli, runner.server.lifecycle, runner.server.supervisor\n"
        "import runner.server.worker, runner.core.dispatch, runner.core.chain\n"
        "names = ('opentelemetry', 'prometheus_client')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in names]\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
