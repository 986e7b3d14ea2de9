"""The exchange's rules, driven with raw bytes and a fake clock: no socket, no sleep."""

from __future__ import annotations

import pytest

from runner.core.errors import error_code_for
from runner.protocol.connection import (
    Answer,
    Call,
    CallTimeout,
    Close,
    Exchange,
    Fault,
    ProtocolViolation,
)
from runner.protocol.frame import RPC, FrameTooLarge, encode_frame
from runner.protocol.messages import (
    ErrCode,
    InfoKind,
    MalformedMessage,
    decode_error,
    decode_extra_info_query,
    encode_error,
    encode_extra_info_reply,
    encode_prepare_conf,
    encode_req_call,
)


class Waiter:
    """Waits for one answer; ``given_up`` as a plugin that stopped waiting would be."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.given_up = False

    def done(self) -> bool:
        return self.given_up


def error_frame(exc: BaseException) -> bytes:
    return encode_frame(RPC.ERROR, encode_error(error_code_for(exc)))


def exchange(**tunables: float) -> Exchange[Waiter]:
    options: dict[str, float] = {"call_timeout": 50.0, **tunables}
    return Exchange(
        error_frame,
        call_timeout=options.pop("call_timeout"),
        max_frame_size=int(options.pop("max_frame_size", (1 << 24) - 1)),
        max_backlog=int(options.pop("max_backlog", 16)),
        stall_timeout=options.pop("stall_timeout", 60.0),
    )


def request(call_id: int) -> bytes:
    return encode_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=7, id=call_id))


def answer(value: bytes | None) -> bytes:
    return encode_frame(RPC.EXTRA_INFO, encode_extra_info_reply(value))


def events(ex: Exchange[Waiter], data: bytes = b"", now: float = 0.0) -> list[object]:
    """Everything the exchange has to act on after receiving ``data`` at ``now``."""
    if data:
        ex.receive_data(data, now)
    got: list[object] = []
    while (event := ex.next_event()) is not None:
        got.append(event)
    return got


def wire_code(frame: bytes) -> ErrCode:
    assert frame[0] == RPC.ERROR
    return ErrCode(decode_error(frame[4:]))


# ------------------------------------------------------------------------ framing


def test_a_whole_frame_in_one_read_is_a_call_on_the_fast_path() -> None:
    ex = exchange()
    frame = request(1)
    assert ex.whole_call(frame) == (RPC.HTTP_REQ_CALL, frame[4:])
    # The same bytes through the general path: the same call.
    assert events(ex, frame) == [Call(RPC.HTTP_REQ_CALL, frame[4:])]


def test_a_frame_split_into_single_bytes_is_one_call() -> None:
    ex = exchange()
    frame = encode_frame(RPC.PREPARE_CONF, encode_prepare_conf([("say", "{}")]))
    for byte in frame[:-1]:
        assert ex.whole_call(bytes([byte])) is None
        assert events(ex, bytes([byte])) == []
    assert events(ex, frame[-1:]) == [Call(RPC.PREPARE_CONF, frame[4:])]
    assert events(ex) == []
    assert not ex.in_frame


def test_several_frames_in_one_read_are_calls_in_order() -> None:
    ex = exchange()
    frames = [request(i) for i in range(3)] + [encode_frame(RPC.PREPARE_CONF, b"")]
    assert ex.whole_call(b"".join(frames)) is None  # not one frame: the general path
    assert events(ex, b"".join(frames)) == [Call(f[0], f[4:]) for f in frames]


def test_a_frame_over_the_limit_gets_an_error_then_the_connection_closes() -> None:
    ex = exchange(max_frame_size=100)
    assert events(ex, encode_frame(RPC.PREPARE_CONF, b"x" * 100)) == [
        Call(RPC.PREPARE_CONF, b"x" * 100)
    ]
    oversized = (RPC.PREPARE_CONF << 24 | 101).to_bytes(4, "big")
    assert ex.whole_call(oversized + b"x" * 101) is None
    [fault] = events(ex, oversized)  # the header alone says it is too large
    assert isinstance(fault, Fault)
    assert isinstance(fault.error, ProtocolViolation)  # the gateway's fault, not ours
    assert isinstance(fault.error.__cause__, FrameTooLarge)
    assert fault.reply is not None
    assert wire_code(fault.reply) == ErrCode.BAD_REQUEST
    assert fault.close is Close.NOW
    assert ex.must_close
    # Nothing after it is served: the stream cannot be trusted any more.
    assert ex.whole_call(request(2)) is None
    assert events(ex, b"x" * 101 + request(2)) == []


# -------------------------------------------------------------------- ExtraInfo


def test_answers_to_queries_in_flight_at_once_go_to_each_in_order() -> None:
    ex = exchange()
    assert events(ex, request(1)) == [Call(RPC.HTTP_REQ_CALL, request(1)[4:])]
    call = ex.call_waits(now=0.0)
    waiters = [Waiter(name) for name in ("a", "b", "nope", "c")]
    for w in waiters:
        frame = ex.ask(w, InfoKind.VAR, w.name)
        assert frame[0] == RPC.EXTRA_INFO
        assert decode_extra_info_query(frame[4:]).name == w.name
    answers = [answer(b"1"), answer(b""), answer(None), answer(b"3"), answer(b"4")]
    assert ex.whole_call(answers[0]) is None  # a call is waiting: not a call
    # One answer alone, on the fast path, then one on the general path, then the rest
    # in one read.
    assert ex.whole_answer(answers[0]) == (waiters[0], b"1")
    assert events(ex, answers[1]) == [Answer(waiters[1], b"")]
    assert ex.whole_answer(b"".join(answers[2:])) is None
    assert events(ex, b"".join(answers[2:4])) == [
        Answer(waiters[2], None),
        Answer(waiters[3], b"3"),
    ]
    assert ex.whole_answer(answers[4]) is None  # answers nothing: not on the fast path
    assert ex.call_done(call, b"reply") == b"reply"
    assert ex.whole_call(request(2)) is not None  # idle again


def test_the_late_answer_to_a_query_given_up_on_goes_to_no_other() -> None:
    ex = exchange()
    events(ex, request(4))
    ex.call_waits(now=0.0)
    slow, fast = Waiter("slow"), Waiter("fast")
    ex.ask(slow, InfoKind.VAR, "slow")
    slow.given_up = True  # the plugin stopped waiting, then asked another
    ex.ask(fast, InfoKind.VAR, "fast")
    assert ex.whole_answer(answer(b"late")) is None  # not on the fast path either
    assert events(ex, answer(b"late") + answer(b"quick")) == [Answer(fast, b"quick")]


def test_an_answer_that_cannot_be_decoded_fails_its_query_only() -> None:
    ex = exchange()
    events(ex, request(1))
    call = ex.call_waits(now=0.0)
    first, second = Waiter(), Waiter()
    ex.ask(first, InfoKind.VAR, "a")
    ex.ask(second, InfoKind.VAR, "b")
    garbage = encode_frame(RPC.EXTRA_INFO, b"\xff\xff\xff\x7f")
    assert ex.whole_answer(garbage) is None
    [garbled] = events(ex, garbage)
    assert isinstance(garbled, Answer)
    assert garbled.waiter is first
    assert isinstance(garbled.error, MalformedMessage)
    assert events(ex, answer(b"ok")) == [Answer(second, b"ok")]
    assert ex.call_done(call, b"reply") == b"reply"
    assert not ex.must_close


@pytest.mark.parametrize("rpc_type", [RPC.HTTP_REQ_CALL, RPC.PREPARE_CONF, RPC.ERROR, 9])
def test_another_frame_while_an_answer_is_awaited_fails_the_call_then_closes(
    rpc_type: int,
) -> None:
    ex = exchange()
    events(ex, request(1))
    call = ex.call_waits(now=0.0)
    asked, abandoned = Waiter("a"), Waiter("b")
    ex.ask(asked, InfoKind.VAR, "a")
    ex.ask(abandoned, InfoKind.VAR, "b")
    abandoned.given_up = True
    [fault] = events(ex, encode_frame(rpc_type, b"????") + request(2))
    assert isinstance(fault, Fault)
    assert isinstance(fault.error, ProtocolViolation)
    assert error_code_for(fault.error) == ErrCode.BAD_REQUEST
    assert fault.waiters == (asked,)  # only those still waiting are failed
    assert fault.reply is None  # the call replies (with the failure) itself...
    assert fault.close is Close.AFTER_CALL
    assert not ex.must_close
    assert ex.call_done(call, b"error reply") == b"error reply"
    assert ex.must_close  # ...and then the connection closes
    assert events(ex) == []  # the stray frame and the one behind it are never served


def test_an_extra_info_frame_that_answers_nothing_is_a_call_for_the_dispatcher() -> None:
    # The dispatcher answers it BAD_REQUEST; the connection stays in step.
    ex = exchange()
    stray = answer(b"?")
    assert ex.whole_call(stray) == (RPC.EXTRA_INFO, stray[4:])


def test_queries_of_a_call_that_is_over_do_not_take_the_next_request() -> None:
    ex = exchange()
    events(ex, request(1))
    call = ex.call_waits(now=0.0)
    gone = Waiter()
    ex.ask(gone, InfoKind.VAR, "x")
    gone.given_up = True
    assert ex.call_done(call, b"reply") == b"reply"
    # The gateway sends the next request without that answer: it is served.
    assert events(ex, request(2)) == [Call(RPC.HTTP_REQ_CALL, request(2)[4:])]
    assert ex.whole_call(request(3)) is not None


# ------------------------------------------------------------------ pipelining


def test_pipelined_requests_wait_behind_the_running_call_and_are_served_in_order() -> None:
    ex = exchange()
    frames = [request(i) for i in range(4)]
    ex.receive_data(b"".join(frames), 0.0)
    assert ex.next_event() == Call(RPC.HTTP_REQ_CALL, frames[0][4:])
    first = ex.call_waits(now=0.0)  # it must wait: the others wait behind it
    assert ex.next_event() is None
    assert ex.has_backlog
    assert ex.whole_call(request(9)) is None
    assert ex.call_done(first, b"r0") == b"r0"
    assert ex.next_event() == Call(RPC.HTTP_REQ_CALL, frames[1][4:])  # answered at once
    assert ex.next_event() == Call(RPC.HTTP_REQ_CALL, frames[2][4:])
    third = ex.call_waits(now=1.0)
    assert ex.next_event() is None
    assert ex.call_done(third, b"r2") == b"r2"
    assert events(ex) == [Call(RPC.HTTP_REQ_CALL, frames[3][4:])]
    assert not ex.has_backlog


def test_reading_pauses_at_the_backlog_bound_and_resumes_when_it_drains() -> None:
    ex = exchange(max_backlog=3)
    events(ex, request(0))
    call = ex.call_waits(now=0.0)
    for i in range(1, 3):
        assert events(ex, request(i)) == []
        assert not ex.reading_paused
    events(ex, request(3))
    assert ex.reading_paused
    assert ex.call_done(call, b"r0") == b"r0"
    assert ex.next_event() == Call(RPC.HTTP_REQ_CALL, request(1)[4:])
    assert not ex.reading_paused
    assert events(ex) == [Call(RPC.HTTP_REQ_CALL, request(i)[4:]) for i in (2, 3)]


# ----------------------------------------------------------------------- stalls


def test_a_frame_completed_in_pieces_within_the_stall_timeout_is_served() -> None:
    ex = exchange(stall_timeout=60.0)
    frame = request(1)
    assert events(ex, frame[:6], now=100.0) == []
    assert ex.stall_due == 160.0
    assert not ex.stalled(159.9)
    assert events(ex, frame[6:], now=159.0) == [Call(RPC.HTTP_REQ_CALL, frame[4:])]
    assert ex.stall_due is None
    assert not ex.stalled(1000.0)
    assert not ex.must_close


def test_a_frame_stuck_half_way_closes_the_connection_after_the_stall_timeout() -> None:
    ex = exchange(stall_timeout=60.0)
    assert events(ex, request(1)[:10], now=5.0) == []
    assert not ex.stalled(64.9)
    assert ex.stalled(65.0)
    assert ex.must_close
    assert ex.buffered == 10


def test_the_stall_clock_starts_with_each_frame() -> None:
    # A whole frame then the start of the next, in one read: the next one's clock
    # starts at that read, not at the first byte of the one before.
    ex = exchange(stall_timeout=60.0)
    events(ex, request(1)[:3], now=0.0)
    assert ex.stall_due == 60.0
    assert len(events(ex, request(1)[3:] + request(2)[:5], now=50.0)) == 1
    assert ex.stall_due == 110.0
    assert not ex.stalled(100.0)


# -------------------------------------------------------------------- deadlines


def test_a_call_past_its_deadline_is_answered_with_a_timeout_and_its_reply_dropped() -> None:
    ex = exchange(call_timeout=50.0)
    events(ex, request(8))
    late = ex.call_waits(now=10.0)
    query = Waiter("remote_addr")
    ex.ask(query, InfoKind.VAR, "remote_addr")
    assert ex.call_due == 60.0
    assert ex.expire(59.9) is None
    timeout = ex.expire(60.0)
    assert timeout is not None
    assert wire_code(timeout) == ErrCode.SERVICE_UNAVAILABLE
    assert not ex.busy
    assert ex.call_due is None
    assert ex.expire(1000.0) is None  # once
    assert ex.call_done(late, b"too late") is None
    # The gateway answers the query late, then sends its next call: the answer is
    # dropped (its call's task was cancelled), the call is served.
    query.given_up = True
    assert events(ex, answer(b"10.0.0.1") + request(9)) == [Call(RPC.HTTP_REQ_CALL, request(9)[4:])]


def test_a_call_after_an_expired_one_meets_its_own_deadline() -> None:
    ex = exchange(call_timeout=50.0)
    events(ex, request(1))
    first = ex.call_waits(now=0.0)
    assert ex.expire(50.0) is not None
    events(ex, request(2))
    second = ex.call_waits(now=70.0)
    assert ex.call_due == 120.0
    assert ex.call_done(first, b"first") is None  # the expired call's reply, at last
    assert ex.busy  # does not end the call that runs now
    assert ex.expire(119.0) is None
    assert ex.call_done(second, b"second") == b"second"


def test_the_timeout_error_says_what_the_deadline_was() -> None:
    seen: list[BaseException] = []

    def record(exc: BaseException) -> bytes:
        seen.append(exc)
        return error_frame(exc)

    ex: Exchange[Waiter] = Exchange(record, call_timeout=0.5)
    events(ex, request(1))
    ex.call_waits(now=0.0)
    ex.expire(1.0)
    [exc] = seen
    assert isinstance(exc, CallTimeout)
    assert "within the 0.5 s call deadline" in str(exc)


def test_a_lost_connection_gives_back_the_waiters_still_waiting() -> None:
    ex = exchange()
    events(ex, request(1))
    ex.call_waits(now=0.0)
    waiting, gone = Waiter("a"), Waiter("b")
    ex.ask(waiting, InfoKind.VAR, "a")
    ex.ask(gone, InfoKind.VAR, "b")
    gone.given_up = True
    assert ex.connection_lost() == (waiting,)
    assert ex.must_close
    assert events(ex, answer(b"x")) == []
