"""One gateway connection: an asyncio Protocol over the frame decoder and the dispatcher.

Each connection feeds bytes to a FrameDecoder and hands whole frames to the
Dispatcher. A call the dispatcher can answer at once is answered inside
``data_received``; a call that must wait (ExtraInfo, async or blocking plugins) runs as
one task, during which the only frames the gateway may send are ExtraInfo replies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from runner.core.errors import BadRequest, ProtocolViolation
from runner.protocol.frame import RPC, FrameDecoder, FrameTooLarge, encode_frame
from runner.protocol.messages import (
    InfoKind,
    MalformedMessage,
    decode_extra_info_reply,
    encode_extra_info_query,
)

if TYPE_CHECKING:
    from runner.server.listener import RunnerServer

log = logging.getLogger("a6.server")

# Frames a non-conforming client may pipeline behind a call in progress before we stop
# reading from it (the gateway never pipelines: it waits for each reply).
_MAX_BACKLOG = 16

# Seconds a frame may take to arrive once its first byte has: the gateway's send timeout.
FRAME_STALL_TIMEOUT = 60.0


# Plugins ask for the same few variables on every call: each query is framed once.
@functools.lru_cache(maxsize=512)
def _extra_info_query_frame(kind: InfoKind, name: str) -> bytes:
    return encode_frame(RPC.EXTRA_INFO, encode_extra_info_query(kind, name))


class Connection(asyncio.Protocol):
    """One connection from a gateway worker: many calls, strictly one after another."""

    def __init__(self, server: RunnerServer) -> None:
        self._server = server
        self._dispatcher = server.dispatcher
        self._decoder = FrameDecoder(server.config.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # made by the server, in its loop
        self._task: asyncio.Task[None] | None = None
        self._call_started = 0.0  # loop time at which the running call started
        # Our ExtraInfo queries still unanswered, oldest first: the gateway answers them
        # in order (a plugin may ask several at once, with asyncio.gather).
        self._waiters: deque[asyncio.Future[bytes | None]] = deque()
        self._stall: asyncio.TimerHandle | None = None
        self._backlog: deque[tuple[int, bytes]] = deque()
        self._close_after_call = False
        self._reading_paused = False
        self._writing_paused = False

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
        decoder = self._decoder
        frame = decoder.whole_frame(data)
        if frame is not None:
            if self._stall is not None:
                self._stop_stall_timer()
            if self._transport is not None:
                self._on_frame(*frame)
            return
        decoder.feed(data)
        while self._transport is not None:
            try:
                frame = decoder.next_frame()
            except FrameTooLarge as exc:
                # Without reading the oversized body we cannot find the next frame.
                log.warning("closing a connection: %s", exc)
                self._transport.write(self._dispatcher.error_frame(BadRequest(str(exc))))
                self._close()
                return
            if frame is None:
                if decoder.in_frame and self._stall is None:
                    self._stall = asyncio.get_running_loop().call_later(
                        FRAME_STALL_TIMEOUT, self._stalled
                    )
                return
            if self._stall is not None:
                self._stop_stall_timer()
            self._on_frame(*frame)

    def _stop_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        # The gateway sends a whole frame in one send with a 60 s timeout: a frame still
        # incomplete after that is never coming, and its buffer would be held forever.
        self._stall = None
        log.warning(
            "closing a connection stuck mid-frame for %g s (%d bytes received)",
            FRAME_STALL_TIMEOUT,
            self._decoder.buffered,
        )
        self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._transport = None
        self._stop_stall_timer()
        self._server.connections.discard(self)
        if self._decoder.in_frame or self._task is not None:
            log.info(
                "a gateway connection closed in the middle of a %s",
                "call" if self._task is not None else "frame",
            )
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the gateway closed the connection"))
        self._waiters.clear()
        if self._task is not None:
            self._task.cancel()
        self._server.connection_done()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it does.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # -------------------------------------------------------------------- frames

    def _on_frame(self, rpc_type: int, payload: bytes) -> None:
        waiters = self._waiters
        if waiters:
            if rpc_type == RPC.EXTRA_INFO:
                waiter = waiters.popleft()
                if not waiter.done():  # else it was cancelled: its answer is dropped
                    try:
                        waiter.set_result(decode_extra_info_reply(payload))
                    except MalformedMessage as exc:
                        waiter.set_exception(exc)
                return
            if self._task is not None:
                self._close_after_call = True
                violation = ProtocolViolation(
                    f"expected an ExtraInfo reply, got a frame of RPC type {rpc_type}"
                )
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(violation)
                waiters.clear()
                return
            waiters.clear()  # queries of a call that is over: not answered after all
        if self._task is not None:
            self._backlog.append((rpc_type, payload))
            self._update_reading()
            return
        reply = self._dispatcher.handle(rpc_type, payload, self)
        if type(reply) is bytes:
            self._write(reply)
        else:
            self._task = self._loop.create_task(self._finish(reply))  # type: ignore[arg-type]
            # The call's deadline: the server looks for calls past theirs when the first
            # one it knows of is due (registering every call costs more than the check).
            started = self._call_started = self._loop.time()
            server = self._server
            if server.deadline_check is None:
                server.check_deadlines_at(started + self._dispatcher.call_timeout)

    async def _finish(self, reply: Coroutine[Any, Any, bytes]) -> None:
        try:
            frame = await reply
        except asyncio.CancelledError:
            return  # the connection is gone; nobody to answer
        finally:
            self._task = None
        self._write(frame)
        if self._close_after_call:
            self._close()
            return
        if self._backlog:
            while self._backlog and self._task is None and self._transport is not None:
                self._on_frame(*self._backlog.popleft())
            self._update_reading()
        if self._server.closing and self._task is None:
            self._close()

    def _write(self, frame: bytes) -> None:
        if self._transport is not None:
            self._transport.write(frame)

    def ask(self, kind: InfoKind, name: str = "") -> asyncio.Future[bytes | None]:
        """Ask the gateway for a variable or a body, on this connection: the future of
        its answer (None: no such value)."""
        # The loop's own create_future: asyncio.get_running_loop() makes a getpid()
        # system call on every use (Python 3.11).
        waiter: asyncio.Future[bytes | None] = self._loop.create_future()
        if self._transport is None:
            waiter.set_exception(ConnectionResetError("the gateway closed the connection"))
            return waiter
        self._transport.write(_extra_info_query_frame(kind, name))
        self._waiters.append(waiter)
        return waiter

    # ----------------------------------------------------------------- lifecycle

    @property
    def busy(self) -> bool:
        return self._task is not None

    def expire_if_due(self, now: float) -> float | None:
        """Cancel the call running here if it is past its deadline; else the time it
        is due (None if no call is running)."""
        task = self._task
        if task is None:
            return None
        dispatcher = self._dispatcher
        due = self._call_started + dispatcher.call_timeout
        if due > now:
            return due
        dispatcher.expired_calls.expire(task)
        return None

    def _update_reading(self) -> None:
        if self._transport is None:
            return
        pause = self._writing_paused or len(self._backlog) >= _MAX_BACKLOG
        if pause and not self._reading_paused:
            self._transport.pause_reading()
        elif not pause and self._reading_paused:
            self._transport.resume_reading()
        self._reading_paused = pause

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def close_when_idle(self) -> None:
        """For shutdown: close now if no call is running, else right after it."""
        if self._task is None:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


