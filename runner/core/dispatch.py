"""The dispatcher: one handler per RPC type, turning a request frame into a reply frame.

A handler gives its ``Caller`` (the gateway connection) the finished reply frame with
``reply`` when it could serve the call without waiting (PrepareConf, chains of plain
plugins), or with ``reply_later`` a coroutine that produces it (chains that await the
gateway or run blocking code). Every exception is turned into an error frame here, and
nowhere else, through ``errors.error_code_for``. Call deadlines are not the
dispatcher's: the connection's exchange keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, Protocol, TypeAlias

from runner.core.cache import ConfCache
from runner.core.calls import (
    RequestEdits,
    ResponseEdits,
    encode_request_reply,
    encode_response_reply,
)
from runner.core.chain import (
    Chain,
    PluginFailed,
    finish_steps,
    route_namespace,
    run_plain_steps,
)
from runner.core.errors import (
    BadRequest,
    ConfRejected,
    ConfTokenNotFound,
    error_code_for,
)
from runner.core.registry import PluginRegistry
from runner.plugin import InfoSource, Plugin, Request, Response
from runner.protocol.frame import MAX_PAYLOAD, RPC, FrameTooLarge, encode_frame
from runner.protocol.messages import (
    ErrCode,
    HTTPReqCall,
    HTTPRespCall,
    MalformedMessage,
    decode_prepare_conf,
    encode_error,
    encode_prepare_conf_reply,
)
from runner.state import StateStore, open_state

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

_ERROR_FRAMES = {code: encode_frame(RPC.ERROR, encode_error(code)) for code in ErrCode}


class Dispatcher:
    def __init__(
        self,
        registry: PluginRegistry,
        cache: ConfCache[Chain],
        *,
        max_frame_size: int = MAX_PAYLOAD,
        executor: Executor | None = None,
        state: StateStore | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        # Where the plugins' shared state lives; the server passes the runner's store
        # (--state-url). By default this process's memory, as tests want it.
        self.state = state if state is not None else open_state("memory://")
        self.max_frame_size = max_frame_size
        self.executor = executor
        self._by_key: dict[str, int] = {}
        self._handlers: dict[int, Handler] = {
            RPC.PREPARE_CONF: self._prepare_conf,
            RPC.HTTP_REQ_CALL: self._req_call,
            RPC.HTTP_RESP_CALL: self._resp_call,
        }

    def handle(self, rpc_type: int, payload: bytes, caller: Caller) -> None:
        """Serve one request frame: its reply goes to ``caller``, now or later."""
        handler = self._handlers.get(rpc_type)
        if handler is None:
            caller.reply(self.error_frame(BadRequest(_unexpected(rpc_type))))
            return
        try:
            handler(payload, caller)
        except Exception as exc:
            # Raised before the handler gave the caller anything (it gives last).
            caller.reply(self.error_frame(exc))

    def error_frame(self, exc: BaseException, call_id: int | None = None) -> bytes:
        """The error frame for ``exc``, logged once at a level that fits whose fault it is."""
        code = error_code_for(exc)
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

    def _frame(self, rpc_type: RPC, payload: bytes, call_id: int) -> bytes:
        size = len(payload)
        if size > self.max_frame_size:
            return self.error_frame(FrameTooLarge(size, self.max_frame_size), call_id)
        # encode_frame, inlined: this runs once per call.
        return (rpc_type << 24 | size).to_bytes(4, "big") + payload

    # ------------------------------------------------------------------ PrepareConf

    def _prepare_conf(self, payload: bytes, caller: Caller) -> None:
        caller.reply(self._prepared(payload))

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
                    return self._frame(RPC.PREPARE_CONF, encode_prepare_conf_reply(token), 0)
        chain = self.build_chain(req.key, conf)
        token = self.cache.put(chain)
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
                plugins.append(self.registry.create(name, raw, self.state, route))
            except BadRequest as exc:
                raise ConfRejected(key, exc) from exc
        return Chain.build(key, conf, plugins)

    def forget_confs(self) -> None:
        """Drop every prepared conf: the gateway re-prepares on CONF_TOKEN_NOT_FOUND.

        (With several workers, a token kept in the shared store is built again from it,
        with the plugins this worker now has.)
        """
        self.cache.clear()
        self._by_key.clear()

    # ------------------------------------------------------------------ HTTPReqCall

    def _req_call(self, payload: bytes, caller: Caller) -> None:
        call = HTTPReqCall(payload)
        try:
            chain = self.cache.lookup(call.conf_token)
        except KeyError:
            raise ConfTokenNotFound(call.conf_token) from None
        edits = RequestEdits()
        request = Request(call, caller, edits)
        try:
            # Plain hooks run right here: a chain of them is answered without a task.
            awaited = run_plain_steps(chain.request_steps, request, edits)
            if awaited < 0:
                reply = encode_request_reply(call.id, edits)
        except Exception as exc:
            caller.reply(self.error_frame(exc, call.id))
            return
        if awaited < 0:
            caller.reply(self._frame(RPC.HTTP_REQ_CALL, reply, call.id))
            return
        caller.reply_later(self._req_call_async(chain, request, edits, awaited))

    async def _req_call_async(
        self, chain: Chain, request: Request, edits: RequestEdits, start: int
    ) -> bytes:
        try:
            await finish_steps(chain.request_steps, request, edits, start, self.executor)
            reply = encode_request_reply(request.id, edits)
        except Exception as exc:
            return self.error_frame(exc, request.id)
        return self._frame(RPC.HTTP_REQ_CALL, reply, request.id)

    # ----------------------------------------------------------------- HTTPRespCall

    def _resp_call(self, payload: bytes, caller: Caller) -> None:
        call = HTTPRespCall(payload)
        try:
            chain = self.cache.lookup(call.conf_token)
        except KeyError:
            raise ConfTokenNotFound(call.conf_token) from None
        edits = ResponseEdits()
        response = Response(call.id, call.status, call.headers, caller, edits)
        try:
            awaited = run_plain_steps(chain.response_steps, response, edits)
            if awaited < 0:
                reply = encode_response_reply(call.id, edits)
        except Exception as exc:
            caller.reply(self.error_frame(exc, call.id))
            return
        if awaited < 0:
            caller.reply(self._frame(RPC.HTTP_RESP_CALL, reply, call.id))
            return
        caller.reply_later(self._resp_call_async(chain, response, edits, awaited))

    async def _resp_call_async(
        self, chain: Chain, response: Response, edits: ResponseEdits, start: int
    ) -> bytes:
        try:
            await finish_steps(chain.response_steps, response, edits, start, self.executor)
            reply = encode_response_reply(response.id, edits)
        except Exception as exc:
            return self.error_frame(exc, response.id)
        return self._frame(RPC.HTTP_RESP_CALL, reply, response.id)


def _unexpected(rpc_type: int) -> str:
    if rpc_type == RPC.EXTRA_INFO:
        return "unexpected ExtraInfo frame: no query of ours is pending"
    if rpc_type == RPC.ERROR:
        return "unexpected error frame from the gateway"
    return f"unknown RPC type {rpc_type}"
