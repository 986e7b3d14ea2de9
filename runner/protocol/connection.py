"""The rules of one gateway connection's exchange, without I/O.

An ``Exchange`` is fed the bytes a gateway connection receives (and, where time
matters, the current time from the caller's clock) and hands back, one at a time, what
the connection must do: run a call, deliver an ExtraInfo answer, act on a protocol
fault. It gives back the bytes to send for the ExtraInfo queries asked and the replies
of calls that had to wait, and says when reading should pause, when a frame has stalled
for too long, when a call is past its deadline and when the connection must close.

The exchange on one connection is strictly sequential: a request frame, then any number
of ExtraInfo round trips (several queries may be in flight at once, answered in order),
then the reply. A call that is answered at once never changes the exchange's state;
only a call that must wait (``call_waits``) does, until its reply (``call_done``) or its
deadline (``expire``).

Nothing here does I/O or reads a clock: the asyncio connection
(``runner.server.connection``) moves the bytes and sets the timers.
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeAlias, TypeVar

from runner.protocol.frame import MAX_PAYLOAD, RPC, FrameDecoder, FrameTooLarge, encode_frame
from runner.protocol.messages import (
    InfoKind,
    MalformedMessage,
    decode_extra_info_reply,
    encode_extra_info_query,
)

__all__ = [
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_STALL_TIMEOUT",
    "Answer",
    "Call",
    "CallTimeout",
    "Close",
    "Event",
    "Exchange",
    "Fault",
    "ProtocolViolation",
    "Waiter",
]

# Frames a non-conforming client may pipeline behind a call in progress before reading
# should pause (the gateway never pipelines: it waits for each reply).
DEFAULT_MAX_BACKLOG: Final = 16

# Seconds a frame may take to arrive once its first byte has: the gateway's send timeout.
DEFAULT_STALL_TIMEOUT: Final = 60.0


class ProtocolViolation(MalformedMessage):
    """The gateway broke the rules of the exchange (a frame other than an ExtraInfo
    answer while one is awaited, a frame over the size limit): its fault, like a message
    that cannot be decoded."""


class CallTimeout(Exception):
    """The plugin chain did not finish within the per-call deadline."""


class Waiter(Protocol):
    """Whoever waits for the answer to one ExtraInfo query (an asyncio future, say)."""

    def done(self) -> bool:
        """True once it no longer waits: answered, failed, or given up on."""
        ...


W = TypeVar("W", bound=Waiter)


class Close(enum.Enum):
    NOW = "now"
    AFTER_CALL = "after the call"


@dataclass(frozen=True, slots=True)
class Call:
    """A request frame to serve: the connection has no other call waiting."""

    rpc_type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Answer(Generic[W]):
    """The gateway's answer to the oldest query still waited for: ``value`` (None: no
    such value), or ``error`` if the answer cannot be decoded."""

    waiter: W
    value: bytes | None
    error: MalformedMessage | None = None


@dataclass(frozen=True, slots=True)
class Fault(Generic[W]):
    """The gateway broke the protocol. Send ``reply`` (if any), fail every waiter in
    ``waiters`` with ``error``, and close the connection as ``close`` says."""

    error: Exception
    reply: bytes | None
    close: Close
    waiters: tuple[W, ...] = ()


Event: TypeAlias = Call | Answer[W] | Fault[W]
"""What ``Exchange.next_event`` returns."""


# Plugins ask for the same few variables on every call: each query is framed once.
@functools.lru_cache(maxsize=512)
def _query_frame(kind: InfoKind, name: str) -> bytes:
    return encode_frame(RPC.EXTRA_INFO, encode_extra_info_query(kind, name))


class Exchange(Generic[W]):
    """One gateway connection's exchange: bytes and times in, events and bytes out.

    ``error_frame`` turns an exception into the error frame to send (the dispatcher's,
    so that errors become frames in one place).
    """

    __slots__ = (
        "_backlog",
        "_call",
        "_call_due",
        "_calls",
        "_close_after_call",
        "_decoder",
        "_error_frame",
        "_queries",
        "_received_at",
        "_stall_since",
        "call_timeout",
        "max_backlog",
        "must_close",
        "stall_timeout",
    )

    def __init__(
        self,
        error_frame: Callable[[BaseException], bytes],
        *,
        call_timeout: float,
        max_frame_size: int = MAX_PAYLOAD,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        self._error_frame = error_frame
        self.call_timeout = call_timeout
        self.max_backlog = max_backlog
        self.stall_timeout = stall_timeout
        self._decoder = FrameDecoder(max_frame_size)
        # Our ExtraInfo queries still unanswered, oldest first: the gateway answers them
        # in order (a plugin may ask several at once, with asyncio.gather).
        self._queries: deque[W] = deque()
        # Frames received while a call waits, served once it is over.
        self._backlog: deque[tuple[int, bytes]] = deque()
        self._calls = 0  # numbers the calls that wait, so a late reply is recognised
        self._call: int | None = None  # the call waiting for its reply, if any
        self._call_due = 0.0
        self._close_after_call = False
        # True once the connection must close (after sending what it was given). An
        # attribute, not a property: it is read after every call that waited.
        self.must_close = False
        self._received_at = 0.0
        self._stall_since: float | None = None

    # ------------------------------------------------------------------- receiving

    def whole_call(self, data: bytes) -> tuple[int, bytes] | None:
        """The fast path: ``data`` as a call's ``(rpc_type, payload)`` if the connection
        is idle and ``data`` is exactly one whole frame (the usual read on a gateway
        connection); else None, and nothing is consumed: use ``receive_data``."""
        if self._call is None and not self._queries and not self._backlog and not self.must_close:
            return self._decoder.whole_frame(data)
        return None

    def whole_answer(self, data: bytes) -> tuple[W, bytes | None] | None:
        """The fast path for an answer: ``(waiter, value)`` if ``data`` is exactly one
        whole ExtraInfo frame that decodes and answers the oldest query, whose waiter
        still waits; else None, and nothing is consumed: use ``receive_data``."""
        queries = self._queries
        if not queries or self.must_close:
            return None
        frame = self._decoder.whole_frame(data)
        if frame is None or frame[0] != RPC.EXTRA_INFO:
            return None
        waiter = queries[0]
        if waiter.done():
            return None
        try:
            value = decode_extra_info_reply(frame[1])
        except MalformedMessage:
            return None  # rare: the general path reports it
        queries.popleft()
        return waiter, value

    def receive_data(self, data: bytes, now: float) -> None:
        """Take bytes received at ``now``; then take the events with ``next_event``."""
        if not self.must_close:
            self._decoder.feed(data)
            self._received_at = now

    def next_event(self) -> Event[W] | None:
        """The next thing to act on, or None when more data is needed (or the
        connection is closed, or every frame left waits behind the running call)."""
        decoder = self._decoder
        while not self.must_close:
            if self._backlog and self._call is None:
                rpc_type, payload = self._backlog.popleft()
            else:
                try:
                    frame = decoder.next_frame()
                except FrameTooLarge as exc:
                    # Without reading the oversized body we cannot find the next frame.
                    # (The gateway's fault: FrameTooLarge alone would be our reply's.)
                    self.must_close = True
                    error = ProtocolViolation(str(exc))
                    error.__cause__ = exc
                    return Fault(error, self._error_frame(error), Close.NOW, self._give_up_all())
                if frame is None:
                    if decoder.in_frame and self._stall_since is None:
                        self._stall_since = self._received_at
                    return None
                self._stall_since = None
                rpc_type, payload = frame
            event = self._on_frame(rpc_type, payload)
            if event is not None:
                return event
        return None

    def _on_frame(self, rpc_type: int, payload: bytes) -> Event[W] | None:
        queries = self._queries
        if queries:
            if rpc_type == RPC.EXTRA_INFO:
                waiter = queries.popleft()
                if waiter.done():
                    return None  # given up on: its answer goes to no other query
                try:
                    return Answer(waiter, decode_extra_info_reply(payload))
                except MalformedMessage as exc:
                    return Answer(waiter, None, exc)
            if self._call is not None:
                self._close_after_call = True
                error = ProtocolViolation(
                    f"expected an ExtraInfo reply, got a frame of RPC type {rpc_type}"
                )
                return Fault(error, None, Close.AFTER_CALL, self._give_up_all())
            queries.clear()  # queries of a call that is over: not answered after all
        if self._call is not None:
            self._backlog.append((rpc_type, payload))
            return None
        return Call(rpc_type, payload)

    def _give_up_all(self) -> tuple[W, ...]:
        waiters = tuple(w for w in self._queries if not w.done())
        self._queries.clear()
        return waiters

    # --------------------------------------------------------------------- sending

    def ask(self, waiter: W, kind: InfoKind, name: str = "") -> bytes:
        """The frame of an ExtraInfo query, whose answer will go to ``waiter``."""
        self._queries.append(waiter)
        return _query_frame(kind, name)

    def call_waits(self, now: float) -> int:
        """The call just received will reply later (from ``now``): its number for
        ``call_done``. Frames received meanwhile wait behind it."""
        self._calls = number = self._calls + 1
        self._call = number
        self._call_due = now + self.call_timeout
        return number

    def call_done(self, call: int, reply: bytes) -> bytes | None:
        """The waiting call ``call`` has its reply: the bytes to send, or None if that
        call is already over (it was past its deadline) and the reply must be dropped.
        Then ``must_close`` says whether to close, and ``next_event`` gives the frames
        that waited behind it."""
        if call != self._call:
            return None
        self._end_call()
        return reply

    def _end_call(self) -> None:
        self._call = None
        if self._close_after_call:
            self.must_close = True

    # ---------------------------------------------------------------------- timing

    @property
    def call_due(self) -> float | None:
        """When the waiting call's deadline passes (None: no call waits)."""
        return self._call_due if self._call is not None else None

    def expire(self, now: float) -> bytes | None:
        """If the waiting call is past its deadline at ``now``: end it, and return the
        timeout error to send as its reply (its own reply, should it come, is dropped;
        the answers to its queries still arrive, and are matched in order). Else None."""
        if self._call is None or self._call_due > now:
            return None
        self._end_call()
        return self._error_frame(
            CallTimeout(
                f"plugin chain did not finish within the {self.call_timeout:g} s call deadline"
            )
        )

    @property
    def stall_due(self) -> float | None:
        """When the frame now half received will have stalled (None: no such frame)."""
        since = self._stall_since
        return None if since is None or self.must_close else since + self.stall_timeout

    def stalled(self, now: float) -> bool:
        """True if a frame begun ``stall_timeout`` ago is still incomplete at ``now``:
        it is never coming (the gateway sends a whole frame within its send timeout),
        and the connection must close so as not to hold its buffer forever."""
        due = self.stall_due
        if due is None or due > now:
            return False
        self.must_close = True
        return True

    # ----------------------------------------------------------------------- state

    @property
    def busy(self) -> bool:
        """True while a call waits for its reply."""
        return self._call is not None

    @property
    def reading_paused(self) -> bool:
        """True while so many frames wait behind the running call that reading should
        pause until it is over."""
        return len(self._backlog) >= self.max_backlog

    @property
    def has_backlog(self) -> bool:
        """True if frames wait to be served (``next_event`` gives them once idle)."""
        return bool(self._backlog)

    @property
    def in_frame(self) -> bool:
        """True if part of a frame has been received."""
        return self._decoder.in_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet taken as a frame."""
        return self._decoder.buffered

    def connection_lost(self) -> tuple[W, ...]:
        """The connection is gone: the waiters still waiting for an answer, to fail."""
        self.must_close = True
        self._call = None
        self._backlog.clear()
        return self._give_up_all()
