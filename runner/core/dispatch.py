"""The dispatcher: one handler per RPC type, turning a request frame into a reply frame.

A handler returns the finished reply frame when it could serve the call without
waiting (PrepareConf, chains of plain plugins), or a coroutine that produces it (chains
that await the gateway or run blocking code). Every exception is turned into an error
frame here, and nowhere else, through ``errors.error_code_for``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeAlias

from runner.core.cache import ConfCache
from runner.core.calls import (
    RequestEdits,
    ResponseEdits,
    encode_request_reply,
    encode_response_reply,
)
from runner.core.chain import Chain, PluginFailed, finish_steps, run_plain_steps
from runner.core.errors import (
    BadRequest,
    CallTimeout,
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

log = logging.getLogger("a6.dispatch")

Reply: TypeAlias = bytes | Coroutine[Any, Any, bytes]
Handler: TypeAlias = Callable[[bytes, InfoSource], Reply]

_ERROR_FRAMES = {code: encode_frame(RPC.ERROR, encode_error(code)) for code in ErrCode}


class Dispatcher:
    def __init__(
        self,
        registry: PluginRegistry,
        cache: ConfCache[Chain],
        *,
        call_timeout: float = 50.0,
        max_frame_size: int = MAX_PAYLOAD,
        executor: Executor | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.call_timeout = call_timeout
        self.max_frame_size = max_frame_size
        self.executor = executor
        self.expired_calls = ExpiredCalls()
        self._by_key: dict[str, int] = {}
        self._handlers: dict[int, Handler] = {
            RPC.PREPARE_CONF: self._prepare_conf,
            RPC.HTTP_REQ_CALL: self._req_call,
            RPC.HTTP_RESP_CALL: self._resp_call,
        }

    def handle(self, rpc_type: int, payload: bytes, source: InfoSource) -> Reply:
        """The reply frame (or a coroutine producing it) for one request frame."""
        handler = self._handlers.get(rpc_type)
        if handler is None:
            return self.error_frame(BadRequest(_unexpected(rpc_type)))
        try:
            return handler(payload, source)
        except Exception as exc:
            return self.error_frame(exc)

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

    def _prepare_conf(self, payload: bytes, source: InfoSource) -> bytes:
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
        plugins: list[Plugin[Any]] = []
        for name, raw in conf:
            try:
                plugins.append(self.registry.create(name, raw))
            except BadRequest as exc:
                raise ConfRejected(req.key, exc) from exc
        chain = Chain.build(req.key, conf, plugins)
        token = self.cache.put(chain)
        if req.key:
            if len(self._by_key) >= self.cache.maxsize:
                self._by_key.clear()  # entries are hints only; bound them like the cache
            self._by_key[req.key] = token
        log.debug("prepared conf token %d for route %r: %s", token, req.key, [n for n, _ in conf])
        return self._frame(RPC.PREPARE_CONF, encode_prepare_conf_reply(token), 0)

    def forget_confs(self) -> None:
        """Drop every prepared conf: the gateway re-prepares on CONF_TOKEN_NOT_FOUND."""
        self.cache.clear()
        self._by_key.clear()

    # ------------------------------------------------------------------ HTTPReqCall

    def _req_call(self, payload: bytes, source: InfoSource) -> Reply:
        call = HTTPReqCall(payload)
        try:
            chain = self.cache.lookup(call.conf_token)
        except KeyError:
            raise ConfTokenNotFound(call.conf_token) from None
        edits = RequestEdits()
        request = Request(call, source, edits)
        try:
            # Plain hooks run right here: a chain of them is answered without a task.
            awaited = run_plain_steps(chain.request_steps, request, edits)
            if awaited < 0:
                reply = encode_request_reply(call.id, edits)
        except Exception as exc:
            return self.error_frame(exc, call.id)
        if awaited < 0:
            return self._frame(RPC.HTTP_REQ_CALL, reply, call.id)
        return self._req_call_async(chain, request, edits, awaited)

    async def _req_call_async(
        self, chain: Chain, request: Request, edits: RequestEdits, start: int
    ) -> bytes:
        try:
            await finish_steps(chain.request_steps, request, edits, start, self.executor)
            reply = encode_request_reply(request.id, edits)
        except asyncio.CancelledError:
            if not self.expired_calls.claim(asyncio.current_task()):
                raise
            return self.error_frame(self._call_timeout(), request.id)
        except Exception as exc:
            return self.error_frame(exc, request.id)
        return self._frame(RPC.HTTP_REQ_CALL, reply, request.id)

    # ----------------------------------------------------------------- HTTPRespCall

    def _resp_call(self, payload: bytes, source: InfoSource) -> Reply:
        call = HTTPRespCall(payload)
        try:
            chain = self.cache.lookup(call.conf_token)
        except KeyError:
            raise ConfTokenNotFound(call.conf_token) from None
        edits = ResponseEdits()
        response = Response(call.id, call.status, call.headers, source, edits)
        try:
            awaited = run_plain_steps(chain.response_steps, response, edits)
            if awaited < 0:
                reply = encode_response_reply(call.id, edits)
        except Exception as exc:
            return self.error_frame(exc, call.id)
        if awaited < 0:
            return self._frame(RPC.HTTP_RESP_CALL, reply, call.id)
        return self._resp_call_async(chain, response, edits, awaited)

    async def _resp_call_async(
        self, chain: Chain, response: Response, edits: ResponseEdits, start: int
    ) -> bytes:
        try:
            await finish_steps(chain.response_steps, response, edits, start, self.executor)
            reply = encode_response_reply(response.id, edits)
        except asyncio.CancelledError:
            if not self.expired_calls.claim(asyncio.current_task()):
                raise
            return self.error_frame(self._call_timeout(), response.id)
        except Exception as exc:
            return self.error_frame(exc, response.id)
        return self._frame(RPC.HTTP_RESP_CALL, reply, response.id)

    def _call_timeout(self) -> CallTimeout:
        return CallTimeout(
            f"plugin chain did not finish within the {self.call_timeout:g} s call deadline"
        )


class ExpiredCalls:
    """The tasks cancelled because their call ran past its deadline.

    The server watches the deadlines (it knows which connection runs which call); the
    dispatcher turns such a cancellation into a timeout error for the gateway, and
    lets every other cancellation (the connection going away) through.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def expire(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` for its deadline."""
        if not task.done():
            self._tasks.add(task)
            task.cancel()

    def claim(self, task: asyncio.Task[Any] | None) -> bool:
        """True if ``task`` was cancelled for its deadline; its cancellation is then
        withdrawn (the call ends normally, with a timeout error for the gateway)."""
        if task is None or task not in self._tasks:
            return False
        self._tasks.discard(task)
        task.uncancel()
        return True

    def forget_done(self) -> None:
        """Drop the tasks that ended without claiming (a plugin swallowed the cancel)."""
        self._tasks = {task for task in self._tasks if not task.done()}


def _unexpected(rpc_type: int) -> str:
    if rpc_type == RPC.EXTRA_INFO:
        return "unexpected ExtraInfo frame: no query of ours is pending"
    if rpc_type == RPC.ERROR:
        return "unexpected error frame from the gateway"
    return f"unknown RPC type {rpc_type}"
