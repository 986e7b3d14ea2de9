"""Tracing with OpenTelemetry (``--tracing``; ``pip install 'a6-runner[otel]'``).

Each call gets a span that continues the W3C ``traceparent`` (and ``tracestate``) of the
request's headers, which APISIX's opentelemetry plugin sets when it runs before the
ext-plugin; each plugin hook that runs gets a child span with its outcome; each
ExtraInfo query the call makes is an event on the call's span, and its answer another.
Spans leave over OTLP/HTTP, configured by the standard ``OTEL_*`` environment variables
(read by the SDK itself: endpoint, headers, service name, sampler...).

This module imports opentelemetry, and is imported only when tracing is on: a runner
without ``--tracing`` loads none of it and its call path does not change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from runner import __version__
from runner.plugin import InfoSource
from runner.protocol.messages import InfoKind

log = logging.getLogger("a6.tracing")

_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_KIND_NAMES = {kind: kind.name.lower() for kind in InfoKind}

# At exit, spans still queued get this long to leave: the gateway SIGKILLs the runner
# 1 s after its SIGTERM, and an unreachable collector must not make us outstay that.
FLUSH_MILLIS = 200


def otlp_provider() -> TracerProvider:
    """A provider exporting over OTLP/HTTP in batches, as ``OTEL_*`` configure it.

    The service is named ``a6-runner`` unless ``OTEL_SERVICE_NAME`` (or
    ``OTEL_RESOURCE_ATTRIBUTES``) names it. Made in each process that serves calls
    (after the fork, for a worker: the batch processor runs a thread).
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "a6-runner"}))
    # shutdown_on_exit=False: its atexit shutdown waits for the exporter's timeout (10 s
    # by default) when the collector is down; ``CallTracer.flush`` bounds that instead.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class CallTracer:
    """Spans for the calls of one runner process.

    The dispatcher starts a call's span (``start_call``) and ends it (``end_call``);
    the chain's steps are wrapped once per chain (``traced_hook``) and find their
    parent by the call object they are given, which works the same on the event loop
    and in a blocking plugin's thread.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("a6-runner", __version__)
        self._propagator = TraceContextTextMapPropagator()
        # id(call object) -> its span, while the call runs.
        self._spans: dict[int, Span] = {}

    def start_call(self, rpc: str, route: str, headers: Iterable[tuple[str, str | None]]) -> Span:
        """A call's span, child of the ``traceparent`` among ``headers`` if there is
        one; ``bind`` it to the call object the plugins will be given."""
        carrier = {}
        for name, value in headers:
            lowered = name.lower()
            if lowered in _TRACE_HEADERS and value:
                carrier[lowered] = value
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"a6-runner {rpc}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"a6.rpc": rpc, "a6.route": route},
        )
        return span

    def bind(self, call: object, span: Span) -> None:
        self._spans[id(call)] = span

    def end_call(self, call: object, outcome: str, failed: bool = False) -> None:
        span = self._spans.pop(id(call), None)
        if span is None:
            return
        span.set_attribute("a6.outcome", outcome)
        if failed:
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def traced_source(self, source: InfoSource, span: Span) -> InfoSource:
        """``source``, with each query and its answer recorded as events of ``span``."""
        return _TracedSource(source, span)

    def traced_hook(
        self,
        plugin: str,
        hook_name: str,
        hook: Callable[[Any], Any],
        awaited: bool,
        stopped: Callable[[Any], bool],
    ) -> Callable[[Any], Any]:
        """``hook`` in a child span of its call's span, named after the plugin, whose
        ``a6.plugin.outcome`` is ``stop`` (it ended the chain), ``continue`` or
        ``error``. ``stopped(call)`` says whether the call is stopped."""
        tracer = self._tracer
        spans = self._spans
        attributes = {"a6.plugin": plugin, "a6.hook": hook_name}

        def context(call: Any) -> Any:
            parent = spans.get(id(call))
            return trace.set_span_in_context(parent) if parent is not None else None

        if awaited:

            async def traced_async(call: Any) -> Any:
                with tracer.start_as_current_span(
                    plugin, context=context(call), attributes=attributes
                ) as span:
                    try:
                        result = await hook(call)
                    except Exception:
                        span.set_attribute("a6.plugin.outcome", "error")
                        raise
                    span.set_attribute("a6.plugin.outcome", "stop" if stopped(call) else "continue")
                    return result

            return traced_async

        def traced(call: Any) -> Any:
            with tracer.start_as_current_span(
                plugin, context=context(call), attributes=attributes
            ) as span:
                try:
                    result = hook(call)
                except Exception:
                    span.set_attribute("a6.plugin.outcome", "error")
                    raise
                span.set_attribute("a6.plugin.outcome", "stop" if stopped(call) else "continue")
                return result

        return traced

    def flush(self) -> None:
        """Send what is queued and stop the exporter, waiting at most ``FLUSH_MILLIS``:
        an unreachable collector must not hold the exit (the gateway SIGKILLs us)."""

        def stop() -> None:
            # Both wait for exports in progress, retries included, whatever timeout
            # they are given: hence a daemon thread, left behind if it takes too long.
            try:
                self.provider.force_flush(FLUSH_MILLIS)
                self.provider.shutdown()
            except Exception as exc:
                log.warning("could not send the last spans: %s", exc)

        stopper = threading.Thread(target=stop, name="a6-otel-stop", daemon=True)
        stopper.start()
        stopper.join(FLUSH_MILLIS / 1000)


class _TracedSource:
    __slots__ = ("_source", "_span")

    def __init__(self, source: InfoSource, span: Span) -> None:
        self._source = source
        self._span = span

    def ask(self, kind: InfoKind, name: str = "") -> Awaitable[bytes | None]:
        attributes = {"a6.extra_info.kind": _KIND_NAMES[kind]}
        if name:
            attributes["a6.extra_info.name"] = name
        self._span.add_event("extra_info.query", attributes)
        return self._answer(self._source.ask(kind, name), attributes)

    async def _answer(
        self, answer: Awaitable[bytes | None], attributes: dict[str, str]
    ) -> bytes | None:
        value = await answer
        size = -1 if value is None else len(value)  # -1: the gateway has no such value
        self._span.add_event("extra_info.answer", {**attributes, "a6.extra_info.bytes": size})
        return value


def load_tracer() -> CallTracer:
    """The tracer of a process serving calls, exporting over OTLP."""
    return CallTracer(otlp_provider())
