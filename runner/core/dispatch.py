"""The dispatcher: one handler per RPC type, turning a request frame into a reply frame.

A handler gives its ``Caller`` (the gateway connection) the finished reply frame with
``reply`` when it could serve the call without waiting (PrepareConf, chains of plain
plugins), or with ``reply_later`` a coroutine that produces it (chains that await the
gateway or run blocking code). Every exception is turned into an error frame here, and
nowhere else, through ``errors.error_code_for``. Call deadlines are not the
dispatcher's: the connection's exchange keeps them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from runner.core.cache import ConfCache
from runner.core.calls import (
    RequestEdits,
    ResponseEdits,
    encode_request_reply,
    encode_response_reply,
)
from runner.core.chain import (
    Chain,
    Hook,
    HookKind,
    PluginFailed,
    finish_steps,
    route_namespace,
    run_plain_steps,
)
from runner.core.errors import (
    BadRequest,
    CallTimeout,
    ConfRejected,
    ConfTokenNotFound,
    error_code_for,
)
from runner.core.logs import plugin_logger
from runner.core.metrics import (
    ERROR_OUTCOMES,
    OUTCOME_OK,
    OUTCOME_PASS,
    OUTCOME_REWRITE,
    OUTCOME_STOP,
    RPC_NAMES,
    Metrics,
)
from runner.core.registry import PluginRegistry
from runner.plugin import InfoSource, Plugin, Request, Response
from runner.protocol.frame import HEADER_SIZE, MAX_PAYLOAD, RPC, FrameTooLarge, encode_frame
from runner.protocol.messages import (
    ErrCode,
    HTTPReqCall,
    HTTPRespCall,
    MalformedMessage,
    decode_prepare_conf,
    encode_error,
    encode_prepare_conf_reply,
    encode_stop_frame,
)
from runner.state import StateStore, open_state

if TYPE_CHECKING:
    from runner.core.tracing import CallTracer

log = logging.getLogger("a6.dispatch")


class Caller(InfoSource, Protocol):
    """The side of a call that waits for its reply: the gateway connection. A handler
    gives it exactly one of ``reply`` or ``reply_later`` per call."""

    def reply(self, frame: bytes) -> None:
        """The call's reply frame, ready now."""
        ...

    def reply_later(self, reply: Coroutine[Any, Any, bytes]) -> None:
        """The call must wait: ``reply`` produces its reply frame (and never raises)."""
        ...


Handler: TypeAlias = Callable[[bytes, Caller], None]

_REQ_CALL: Final = int(RPC.HTTP_REQ_CALL)
_ERROR_FRAMES = {code: encode_frame(RPC.ERROR, encode_error(code)) for code in ErrCode}
# An error frame sent -> the outcome the metrics and traces give its call.
_FRAME_OUTCOMES = {frame: ERROR_OUTCOMES[code] for code, frame in _ERROR_FRAMES.items()}


class Dispatcher:
    def __init__(
        self,
        registry: PluginRegistry,
        cache: ConfCache[Chain],
        *,
        max_frame_size: int = MAX_PAYLOAD,
        executor: Executor | None = None,
        metrics: Metrics | None = None,
        tracer: CallTracer | None = None,
        state: StateStore | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        # Where the plugins' shared state lives; the server passes the runner's store
        # (--state-url). By default this process's memory, as tests want it.
        self.state = state if state is not None else open_state("memory://")
        self.max_frame_size = max_frame_size
        self._max_frame = max_frame_size + HEADER_SIZE  # a whole frame's bytes, at most
        self.executor = executor
        # Observers of the calls (--metrics-listen, --tracing). Without either, a call
        # costs one check of ``_observed`` more than it would with neither existing.
        self.metrics = metrics
        self.tracer = tracer
        self._observed = metrics is not None or tracer is not None
        self._req_counts = metrics.calls_of("http_req_call") if metrics is not None else None
        self._resp_counts = metrics.calls_of("http_resp_call") if metrics is not None else None
        self._by_key: dict[str, int] = {}
        self._handlers: dict[int, Handler] = {
            RPC.PREPARE_CONF: self._prepare_conf,
            RPC.HTTP_REQ_CALL: self.req_call,
            RPC.HTTP_RESP_CALL: self._resp_call,
        }

    def handle(self, rpc_type: int, payload: bytes, caller: Caller) -> None:
        """Serve one request frame: its reply goes to ``caller``, now or later."""
        handler = self._handlers.get(rpc_type)
        if handler is None:
            if self.metrics is not None:
                self.metrics.count_rejected("unknown_type")
            caller.reply(self.error_frame(BadRequest(_unexpected(rpc_type))))
            return
        try:
            handler(payload, caller)
        except Exception as exc:
            # Raised before the handler gave the caller anything (it gives last).
            self._refuse(rpc_type, exc, caller)

    def _refuse(self, rpc_type: int, exc: Exception, caller: Caller) -> None:
        """Answer a call that could not be served with the error frame for ``exc``."""
        frame = self.error_frame(exc)
        if self._observed:
            self._observe(rpc_type, frame, "", None)
        caller.reply(frame)

    def error_frame(self, exc: BaseException, call_id: int | None = None) -> bytes:
        """The error frame for ``exc``, logged once at a level that fits whose fault it is."""
        code = error_code_for(exc)
        if self.metrics is not None and isinstance(exc, CallTimeout):
            self.metrics.call_timeouts += 1
        where = f" (call {call_id})" if call_id is not None else ""
        if isinstance(exc, ConfTokenNotFound):
            # Routine: the gateway re-prepares and retries. Not worth a line per call.
            log.debug("%s%s", exc, where)
        elif isinstance(exc, ConfRejected):
            log.warning("%s", exc)
        elif isinstance(exc, BadRequest | MalformedMessage):
            log.warning("bad request%s: %s", where, exc)
        elif isinstance(exc, PluginFailed):
            log.error("%s%s", exc, where, exc_info=exc.__cause__)
        else:
            log.error("call failed%s: %s", where, exc or type(exc).__name__)
        return _ERROR_FRAMES[code]

    def _frame(self, rpc_type: int, payload: bytes, call_id: int) -> bytes:
        size = len(payload)
        if size > self.max_frame_size:
            return self.error_frame(FrameTooLarge(size, self.max_frame_size), call_id)
        # encode_frame, inlined: this runs once per call.
        return (rpc_type << 24 | size).to_bytes(4, "big") + payload

    # ------------------------------------------------------------------ PrepareConf

    def _prepare_conf(self, payload: bytes, caller: Caller) -> None:
        frame = self._prepared(payload)
        if self._observed:
            self._observe(RPC.PREPARE_CONF, frame, OUTCOME_OK, None)
        caller.reply(frame)

    def _prepared(self, payload: bytes) -> bytes:
        req = decode_prepare_conf(payload)
        conf = tuple(req.conf)
        # The key (route id + config version) is deprecated but still sent: reuse the
        # chain it named if the config is identical, so per-route plugin state (rate
        # limits, caches) survives the gateway's periodic re-prepare.
        if req.key:
            token = self._by_key.get(req.key)
            if token is not None:
                chain = self.cache.get(token)
                if chain is not None and chain.conf == conf:
                    self.cache.refresh(token, chain)
                    if self.metrics is not None:
                        self.metrics.confs_prepared["reused"] += 1
                    return self._frame(RPC.PREPARE_CONF, encode_prepare_conf_reply(token), 0)
        chain = self.build_chain(req.key, conf)
        token = self.cache.put(chain)
        if self.metrics is not None:
            self.metrics.confs_prepared["new"] += 1
        if req.key:
            if len(self._by_key) >= self.cache.maxsize:
                self._by_key.clear()  # entries are hints only; bound them like the cache
            self._by_key[req.key] = token
        log.debug("prepared conf token %d for route %r: %s", token, req.key, [n for n, _ in conf])
        return self._frame(RPC.PREPARE_CONF, encode_prepare_conf_reply(token), 0)

    def replace_registry(self, registry: PluginRegistry) -> None:
        """Serve ``registry``'s plugins from now on (a reload). Prepared confs are
        dropped, so the gateway re-prepares each route with the new plugins; calls in
        flight finish with the plugins they started with."""
        self.registry = registry
        self.forget_confs()

    def build_chain(self, key: str, conf: tuple[tuple[str, str], ...]) -> Chain:
        """The chain of one conf, each plugin created with its checked config.

        Also how a worker builds a conf another worker prepared (from the shared store).
        """
        plugins: list[Plugin[Any]] = []
        route = route_namespace(key, conf)
        for name, raw in conf:
            try:
                plugin = self.registry.create(name, raw, self.state, route)
            except BadRequest as exc:
                raise ConfRejected(key, exc) from exc
            # Plugin.log, naming the route this instance serves (it serves only that one).
            plugin.__dict__["log"] = plugin_logger(plugin.name, key)
            plugins.append(plugin)
        return Chain.build(key, conf, plugins, self._wrap_hook if self._observed else None)

    def _wrap_hook(self, plugin: Plugin[Any], hook_name: str, hook: Hook, kind: HookKind) -> Hook:
        """A step's hook, timed (metrics) and in a span of its own (tracing)."""
        awaited = kind is HookKind.ASYNC
        if self.metrics is not None:
            hook = self.metrics.timed_hook(plugin.name, hook_name, hook, awaited)
        if self.tracer is not None:
            hook = self.tracer.traced_hook(plugin.name, hook_name, hook, awaited, _stopped)
        return hook

    def forget_confs(self) -> None:
        """Drop every prepared conf: the gateway re-prepares on CONF_TOKEN_NOT_FOUND.

        (With several workers, a token kept in the shared store is built again from it,
        with the plugins this worker now has.)
        """
        self.cache.clear()
        self._by_key.clear()

    # ------------------------------------------------------------------ HTTPReqCall

    def req_call(self, payload: bytes, caller: Caller) -> None:
        """``handle(RPC.HTTP_REQ_CALL, payload, caller)``: the usual frame, which a
        connection hands over directly (one step less per call)."""
        try:
            call = HTTPReqCall(payload)
            try:
                chain = self.cache.lookup(call.conf_token)
            except KeyError:
                raise ConfTokenNotFound(call.conf_token) from None
            edits = RequestEdits()
            tracer = self.tracer
            if tracer is None:
                request = Request(call, caller, edits)
            else:
                span = tracer.start_call(RPC_NAMES[RPC.HTTP_REQ_CALL], chain.key, call.headers)
                request = Request(call, tracer.traced_source(caller, span), edits)
                tracer.bind(request, span)
        except Exception as exc:
            self._refuse(_REQ_CALL, exc, caller)
            return
        try:
            # Plain hooks run right here: a chain of them is answered without a task.
            awaited = run_plain_steps(chain.request_steps, request, edits)
            if awaited < 0:
                stop = edits.stop
                if stop is not None:
                    # A Stop is framed whole, from what it encoded the first time.
                    frame = encode_stop_frame(call.id, stop)
                    if len(frame) > self._max_frame:
                        frame = self._frame(_REQ_CALL, frame[4:], call.id)
                else:
                    frame = self._frame(_REQ_CALL, encode_request_reply(call.id, edits), call.id)
        except Exception as exc:
            frame = self.error_frame(exc, call.id)
            if self._observed:
                self._observe(RPC.HTTP_REQ_CALL, frame, "", request)
            caller.reply(frame)
            return
        if awaited < 0:
            if self._observed:
                self._observe_request(frame, edits, request)
            caller.reply(frame)
            return
        caller.reply_later(self._req_call_async(chain, request, edits, awaited))

    async def _req_call_async(
        self, chain: Chain, request: Request, edits: RequestEdits, start: int
    ) -> bytes:
        try:
            await finish_steps(chain.request_steps, request, edits, start, self.executor)
            reply = encode_request_reply(request.id, edits)
        except asyncio.CancelledError:
            # Past its deadline (the exchange answered) or the gateway went away.
            if self.tracer is not None:
                self.tracer.end_call(request, "cancelled", True)
            raise
        except Exception as exc:
            frame = self.error_frame(exc, request.id)
        else:
            frame = self._frame(RPC.HTTP_REQ_CALL, reply, request.id)
        if self._observed:
            self._observe_request(frame, edits, request)
        return frame

    # ----------------------------------------------------------------- HTTPRespCall

    def _resp_call(self, payload: bytes, caller: Caller) -> None:
        call = HTTPRespCall(payload)
        try:
            chain = self.cache.lookup(call.conf_token)
        except KeyError:
            raise ConfTokenNotFound(call.conf_token) from None
        edits = ResponseEdits()
        tracer = self.tracer
        if tracer is None:
            response = Response(call.id, call.status, call.headers, caller, edits)
        else:
            span = tracer.start_call(RPC_NAMES[RPC.HTTP_RESP_CALL], chain.key, call.headers)
            source = tracer.traced_source(caller, span)
            response = Response(call.id, call.status, call.headers, source, edits)
            tracer.bind(response, span)
        try:
            awaited = run_plain_steps(chain.response_steps, response, edits)
            if awaited < 0:
                reply = encode_response_reply(call.id, edits)
        except Exception as exc:
            frame = self.error_frame(exc, call.id)
            if self._observed:
                self._observe(RPC.HTTP_RESP_CALL, frame, "", response)
            caller.reply(frame)
            return
        if awaited < 0:
            frame = self._frame(RPC.HTTP_RESP_CALL, reply, call.id)
            if self._observed:
                self._observe_response(frame, edits, response)
            caller.reply(frame)
            return
        caller.reply_later(self._resp_call_async(chain, response, edits, awaited))

    async def _resp_call_async(
        self, chain: Chain, response: Response, edits: ResponseEdits, start: int
    ) -> bytes:
        try:
            await finish_steps(chain.response_steps, response, edits, start, self.executor)
            reply = encode_response_reply(response.id, edits)
        except asyncio.CancelledError:
            if self.tracer is not None:
                self.tracer.end_call(response, "cancelled", True)
            raise
        except Exception as exc:
            frame = self.error_frame(exc, response.id)
        else:
            frame = self._frame(RPC.HTTP_RESP_CALL, reply, response.id)
        if self._observed:
            self._observe_response(frame, edits, response)
        return frame

    # ------------------------------------------------------------------ observing

    def _observe(self, rpc_type: int, frame: bytes, outcome: str, call: object) -> None:
        """Count a call answered with ``frame`` and end its span. ``outcome`` is what
        its edits amount to; an error frame's own outcome wins (the reply may have
        become one: a reply too large to send)."""
        if frame[0] == RPC.ERROR:  # the frame's type byte
            outcome = _FRAME_OUTCOMES.get(frame, "bad_request")
            failed = True
        else:
            failed = False
        if self.metrics is not None:
            self.metrics.count_call(RPC_NAMES.get(rpc_type, "unknown"), outcome)
        if self.tracer is not None and call is not None:
            self.tracer.end_call(call, outcome, failed)

    # The two below are ``_observe`` for the calls' usual paths, with fewer steps.

    def _observe_request(self, frame: bytes, edits: RequestEdits, request: object) -> None:
        if frame[0]:  # a reply, not an error frame (type 0)
            failed = False
            if edits.stop is not None:
                outcome = OUTCOME_STOP
            elif not edits.__dict__:  # the records' fields are written only when changed
                outcome = OUTCOME_PASS
            else:
                outcome = _request_outcome(edits)
        else:
            failed = True
            outcome = _FRAME_OUTCOMES.get(frame, "bad_request")
        counts = self._req_counts
        if counts is not None:
            counts[outcome] += 1
        tracer = self.tracer
        if tracer is not None:
            tracer.end_call(request, outcome, failed)

    def _observe_response(self, frame: bytes, edits: ResponseEdits, response: object) -> None:
        if frame[0]:
            failed = False
            outcome = _response_outcome(edits)
        else:
            failed = True
            outcome = _FRAME_OUTCOMES.get(frame, "bad_request")
        counts = self._resp_counts
        if counts is not None:
            counts[outcome] += 1
        tracer = self.tracer
        if tracer is not None:
            tracer.end_call(response, outcome, failed)


def _request_outcome(edits: RequestEdits) -> str:
    if edits.stop is not None:
        return OUTCOME_STOP
    if (
        edits.headers
        or edits.args
        or edits.path is not None
        or edits.resp_headers
        or edits.body is not None
    ):
        return OUTCOME_REWRITE
    return OUTCOME_PASS


def _response_outcome(edits: ResponseEdits) -> str:
    if edits.status or edits.header_log or edits.body is not None:
        return OUTCOME_REWRITE
    return OUTCOME_PASS


def _stopped(call: object) -> bool:
    return isinstance(call, Request) and call.stopped


def _unexpected(rpc_type: int) -> str:
    if rpc_type == RPC.EXTRA_INFO:
        return "unexpected ExtraInfo frame: no query of ours is pending"
    if rpc_type == RPC.ERROR:
        return "unexpected error frame from the gateway"
    return f"unknown RPC type {rpc_type}"
