"""Repeated log lines are held back so a bad client cannot flood the gateway's error.log."""

from __future__ import annotations

import logging

from runner.core.logs import RepeatFilter


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("a6.dispatch", logging.WARNING, __file__, 1, msg, args, None)


def test_lines_differing_only_in_numbers_are_held_back_after_a_burst() -> None:
    now = [0.0]
    f = RepeatFilter(burst=3, window=10, clock=lambda: now[0])
    passed = [f.filter(record("bad request (call %d): offset %d", i, i * 7)) for i in range(10)]
    assert passed == [True, True, True] + [False] * 7
    # another kind of line is not affected
    assert f.filter(record("plugin 'auth' raised in on_request (call %d)", 1))
    now[0] += 10
    late = record("bad request (call %d): offset %d", 99, 5)
    assert f.filter(late)
    assert late.getMessage() == "bad request (call 99): offset 5 [7 similar line(s) held back]"
    assert f.filter(record("bad request (call %d): offset %d", 100, 5))
    assert record("x").getMessage() == "x"


def test_the_filter_remembers_a_bounded_number_of_kinds() -> None:
    f = RepeatFilter(burst=1, window=10, clock=lambda: 0.0, max_kinds=5)
    for i in range(50):
        assert f.filter(record(f"kind {chr(65 + i % 26)}{chr(65 + i // 26)}"))
    assert len(f._kinds) <= 5
