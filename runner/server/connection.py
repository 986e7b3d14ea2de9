"""One gateway connection: a thin asyncio Protocol over the exchange's state machine.

The rules of the exchange (the order of ExtraInfo answers, pipelined frames, faults,
stalled frames, call deadlines) are ``runner.protocol.connection.Exchange``'s. This
module moves the bytes, sets the timers the exchange asks for, and runs as a task each
call that must wait (ExtraInfo, async or blocking plugins). A call the dispatcher can
answer at once is answered inside ``data_received``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from runner.protocol.connection import Answer, Call, Close, Exchange, Fault
from runner.protocol.frame import RPC
from runner.protocol.messages import InfoKind

if TYPE_CHECKING:
    from runner.server.listener import RunnerServer

log = logging.getLogger("a6.server")

_Waiter = asyncio.Future[bytes | None]
_REQ_CALL: Final = int(RPC.HTTP_REQ_CALL)


class Connection(asyncio.Protocol):
    """One connection from a gateway worker: many calls, strictly one after another.

    It is the dispatcher's ``Caller``: calls reply through it, and ask the gateway
    through it.
    """

    def __init__(self, server: RunnerServer, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._server = server
        self._handle = server.dispatcher.handle
        self._req_call = server.dispatcher.req_call
        self._exchange: Exchange[_Waiter] = Exchange(
            server.dispatcher.error_frame,
            call_timeout=server.config.call_timeout,
            max_frame_size=server.config.max_frame_size,
            max_backlog=server.max_backlog,
            stall_timeout=server.frame_stall_timeout,
        )
        self._transport: asyncio.Transport | None = None
        # Made by the server, in its loop. (The loop's own methods: get_running_loop()
        # makes a getpid() system call on every use, Python 3.11.)
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._stall_due: float | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._ended_by: str | None = None  # why we ended the connection ourselves
        self._metrics = server.metrics
        # With metrics: the kind of each ExtraInfo query still unanswered, by waiter,
        # so that its answer's bytes are counted under it (emptied as each call ends).
        self._asked: dict[_Waiter, InfoKind] = {}

    # --------------------------------------------------------------- asyncio events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        transport = cast(asyncio.Transport, transport)
        server = self._server
        if server.closing or len(server.connections) >= server.config.max_connections:
            server.note_refused()
            transport.abort()
            return
        self._transport = transport
        server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        # The fast paths: a whole request frame while idle, a whole answer while a call
        # waits (no call waits on the exchange exactly when no task runs here).
        if self._task is None:
            frame = exchange.whole_call(data)
            if frame is not None:
                if self._transport is not None:
                    if frame[0] == _REQ_CALL:
                        self._req_call(frame[1], self)
                    else:
                        self._handle(frame[0], frame[1], self)
                return
        else:
            answer = exchange.whole_answer(data)
            if answer is not None:
                if self._metrics is not None:
                    self._count_answer(answer[0], answer[1])
                answer[0].set_result(answer[1])
                return
        exchange.receive_data(data, self._loop.time())
        self._serve_events()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._transport = None
        self._cancel_stall_timer()
        self._server.connections.discard(self)
        exchange = self._exchange
        ended_by = self._ended_by
        # When we ended it ourselves, the reason is in the log already.
        if ended_by is None and (exchange.in_frame or self._task is not None):
            log.info(
                "a gateway connection closed in the middle of a %s",
                "call" if self._task is not None else "frame",
            )
        why = "the gateway closed the connection" if ended_by is None else f"closed for {ended_by}"
        for waiter in exchange.connection_lost():
            waiter.set_exception(ConnectionResetError(why))
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._server.connection_done()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it does.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # -------------------------------------------------------------------- events

    def _serve_events(self) -> None:
        """Act on every event the exchange has, then set reading and timers as it says."""
        exchange = self._exchange
        while self._transport is not None:
            event = exchange.next_event()
            if event is None:
                break
            if isinstance(event, Call):
                self._handle(event.rpc_type, event.payload, self)
            elif isinstance(event, Answer):
                waiter = event.waiter
                if event.error is None:
                    if self._metrics is not None:
                        self._count_answer(waiter, event.value)
                    waiter.set_result(event.value)
                else:
                    waiter.set_exception(event.error)
            else:
                self._on_fault(event)
        if self._transport is None:
            return
        self._update_reading()
        if exchange.stall_due != self._stall_due:
            self._set_stall_timer(exchange.stall_due)

    def _on_fault(self, fault: Fault[_Waiter]) -> None:
        if self._metrics is not None:
            # Closing at once is the oversized frame's fault; the other, a frame out of turn.
            self._metrics.count_rejected("too_large" if fault.close is Close.NOW else "unexpected")
        for waiter in fault.waiters:
            waiter.set_exception(fault.error)
        if fault.reply is not None:
            self._write(fault.reply)
        if fault.close is Close.NOW:
            log.warning("closing a connection: %s", fault.error)
            self._end("a protocol fault")

    # ---------------------------------------------------- the dispatcher's Caller

    def reply(self, frame: bytes) -> None:
        """The reply of the call just received, answered at once."""
        transport = self._transport
        if transport is not None:
            transport.write(frame)

    def reply_later(self, reply: Coroutine[Any, Any, bytes]) -> None:
        """The call just received replies when ``reply`` is done: run it as a task."""
        loop = self._loop
        started = loop.time()
        call = self._exchange.call_waits(started)
        self._task = loop.create_task(self._finish(call, reply))
        # The call's deadline: the server looks for calls past theirs when the first one
        # it knows of is due (registering every call costs more than the check).
        server = self._server
        if server.deadline_check is None:
            server.check_deadlines_at(started + self._exchange.call_timeout)

    def ask(self, kind: InfoKind, name: str = "") -> asyncio.Future[bytes | None]:
        """Ask the gateway for a variable or a body, on this connection: the future of
        its answer (None: no such value)."""
        waiter: _Waiter = self._loop.create_future()
        transport = self._transport
        if transport is None:
            waiter.set_exception(ConnectionResetError("the gateway closed the connection"))
            return waiter
        transport.write(self._exchange.ask(waiter, kind, name))
        if self._metrics is not None:
            self._asked[waiter] = kind
        return waiter

    def _count_answer(self, waiter: _Waiter, value: bytes | None) -> None:
        kind = self._asked.pop(waiter, None)
        if kind is not None and self._metrics is not None:
            self._metrics.count_extra_info(kind, value)

    async def _finish(self, call: int, reply: Coroutine[Any, Any, bytes]) -> None:
        try:
            frame = await reply
        except asyncio.CancelledError:
            return  # past its deadline (the timeout error was sent), or the connection is gone
        if self._asked:
            self._asked.clear()  # queries given up on: their answers count for nothing
        out = self._exchange.call_done(call, frame)
        if out is None:
            return  # the call was past its deadline: its reply has been sent already
        self._task = None
        transport = self._transport
        if transport is None:
            return
        transport.write(out)
        exchange = self._exchange
        if exchange.must_close or exchange.has_backlog or self._server.closing:
            self._after_call()

    def _after_call(self) -> None:
        if self._transport is None:
            return
        exchange = self._exchange
        if exchange.must_close:
            self._close()
            return
        # Frames left in the decoder were all taken (into the backlog) as they came.
        if exchange.has_backlog:
            self._serve_events()  # the frames that waited behind the call
        if self._server.closing and self._task is None:
            self._close()

    def _write(self, frame: bytes) -> None:
        if self._transport is not None:
            self._transport.write(frame)

    # ----------------------------------------------------------------- timers

    def expire_if_due(self, now: float) -> float | None:
        """End the call waiting here if it is past its deadline at ``now`` (its reply is
        then the timeout error); the time the call waiting here is due (None if none)."""
        exchange = self._exchange
        timeout_reply = exchange.expire(now)
        if timeout_reply is None:
            return exchange.call_due
        task = self._task
        self._task = None
        if task is not None:
            task.cancel()
        self._write(timeout_reply)
        # Not now: a call from the backlog would set a deadline timer of its own while
        # the server is still working out when to look next.
        self._loop.call_soon(self._after_call)
        return None

    def _set_stall_timer(self, due: float | None) -> None:
        self._cancel_stall_timer()
        self._stall_due = due
        if due is not None:
            self._stall = self._loop.call_at(due, self._stall_timer_fired)

    def _cancel_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._stall_due = None

    def _stall_timer_fired(self) -> None:
        self._stall = None
        self._stall_due = None
        exchange = self._exchange
        if not exchange.stalled(self._loop.time()):
            self._set_stall_timer(exchange.stall_due)
            return
        log.warning(
            "closing a connection stuck mid-frame for %g s (%d bytes received)",
            exchange.stall_timeout,
            exchange.buffered,
        )
        if self._metrics is not None:
            self._metrics.count_rejected("stalled")
        self._end("a stalled frame", abort=True)

    # ----------------------------------------------------------------- lifecycle

    @property
    def busy(self) -> bool:
        return self._task is not None

    def _update_reading(self) -> None:
        if self._transport is None:
            return
        pause = self._writing_paused or self._exchange.reading_paused
        if pause and not self._reading_paused:
            self._transport.pause_reading()
        elif not pause and self._reading_paused:
            self._transport.resume_reading()
        self._reading_paused = pause

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _end(self, why: str, *, abort: bool = False) -> None:
        """Close (or abort) the connection for a reason of ours, already logged."""
        if self._transport is None:
            return
        self._ended_by = why
        if abort:
            self._transport.abort()
        else:
            self._transport.close()

    def close_when_idle(self) -> None:
        """For shutdown: close now if no call is running, else right after it."""
        if self._task is None:
            self._close()

    def abort_for_shutdown(self) -> None:
        """The shutdown grace is over: drop the connection and the call running on it.
        (The server has said so in the log: this is not the gateway going away.)"""
        self._end("the end of the shutdown grace", abort=True)
