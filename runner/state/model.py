"""What every state backend must do, in pure Python: no I/O, no clock of its own.

The memory and local backends call these functions inside their atomic section; the
Redis backend runs the same rules in Lua on the server (``redis_backend.py``), and the
shared test suite holds the three to the same answers. Values are bytes everywhere, and a
token bucket is stored as ``b"<tokens> <timestamp>"`` in every backend, so a key means the
same thing whichever backend holds it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Redis accepts exactly this as an integer (no sign "+", no leading zeros, no spaces);
# the other backends refuse what Redis refuses, so a plugin tested on one behaves the same
# on another.
_COUNTER = re.compile(rb"0|-?[1-9][0-9]{0,18}")
_INT64 = (-(2**63), 2**63 - 1)


class StateUnavailable(Exception):
    """The shared state could not answer in time; the operation did not happen (or, for a
    write whose reply was lost, may have happened once).

    Raised within the backend's bounded wait (Redis: connect timeout + operation timeout;
    local: lock timeout), never after an unbounded one. Catch it to fail open or closed,
    or use ``State.take(..., if_unavailable=...)``.
    """


@dataclass(frozen=True, slots=True)
class Take:
    """The answer of a token bucket to ``take``.

    ``allowed``: the tokens were taken. ``remaining``: whole tokens left after this call.
    ``retry_after``: seconds until ``cost`` tokens will be there (0 when allowed).
    ``unavailable``: the state could not be reached and this answer is the plugin's
    ``if_unavailable`` choice, not the bucket's.
    """

    allowed: bool
    remaining: int
    retry_after: float
    unavailable: bool = False


def encode_bucket(tokens: float, stamp: float) -> bytes:
    # repr() is the shortest text that reads back as the same float.
    return f"{tokens!r} {stamp!r}".encode()


def decode_bucket(stored: bytes) -> tuple[float, float]:
    try:
        tokens, stamp = stored.split(b" ")
        return float(tokens), float(stamp)
    except ValueError:
        raise ValueError("the key holds a value that is not a token bucket") from None


def take_from_bucket(
    stored: bytes | None, now: float, rate: float, burst: int, cost: int
) -> tuple[Take, bytes | None, float]:
    """Refill the bucket to ``now`` and take ``cost`` tokens if they are there.

    Returns the answer, the bytes to store (None: leave the key as it is) and the TTL to
    store them with: the time until the bucket is full again, after which a missing key
    reads as a full bucket, so idle clients cost no memory.
    """
    tokens = float(burst)
    if stored is not None:
        old, stamp = decode_bucket(stored)
        # A clock that went back refills nothing rather than draining the bucket.
        tokens = min(float(burst), old + max(0.0, now - stamp) * rate)
    if tokens >= cost:
        tokens -= cost
        return (
            Take(True, math.floor(tokens), 0.0),
            encode_bucket(tokens, now),
            (burst - tokens) / rate,
        )
    # A refused take changes nothing: the next call refills from the same stamp.
    return Take(False, math.floor(tokens), (cost - tokens) / rate), None, 0.0


def parse_counter(stored: bytes) -> int:
    if _COUNTER.fullmatch(stored) is None:
        raise ValueError("the key holds a value that is not an integer counter")
    value = int(stored)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError("the key holds a value that is not an integer counter")
    return value


def add_to_counter(stored: bytes | None, amount: int) -> int:
    value = (0 if stored is None else parse_counter(stored)) + amount
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError("the counter would overflow a signed 64-bit integer")
    return value
