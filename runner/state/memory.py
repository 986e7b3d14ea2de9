"""State in this process's memory: for tests (``runner.testing``) and a single worker.

Each operation runs without an ``await`` inside it, so on one event loop it is atomic.
It is not shared with any other process: with several workers use the local backend.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from runner.state.model import Take, add_to_counter, take_from_bucket

Clock = Callable[[], float]


class MemoryBackend:
    """A dict of ``key -> (value, expires)``, expired entries swept by a heap of deadlines."""

    kind = "memory"
    where = "this process's memory"

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}
        # (expires, key) per write with a TTL; an entry is stale if the key was rewritten.
        self._deadlines: list[tuple[float, str]] = []

    def _live(self, key: str, now: float) -> tuple[bytes, float | None] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            del self._data[key]
            return None
        return entry

    def _store(self, key: str, value: bytes, expires: float | None, now: float) -> None:
        self._data[key] = (value, expires)
        if expires is not None:
            heapq.heappush(self._deadlines, (expires, key))
        # Sweep what has expired, so keys nobody reads again do not pile up.
        while self._deadlines and self._deadlines[0][0] <= now:
            when, old = heapq.heappop(self._deadlines)
            entry = self._data.get(old)
            if entry is not None and entry[1] == when:
                del self._data[old]

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key, self._clock())
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        now = self._clock()
        self._store(key, value, None if ttl is None else now + ttl, now)

    async def delete(self, key: str) -> bool:
        found = self._live(key, self._clock()) is not None
        self._data.pop(key, None)
        return found

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        now = self._clock()
        entry = self._live(key, now)
        value = add_to_counter(None if entry is None else entry[0], amount)
        expires = None if entry is None else entry[1]
        if expires is None and ttl is not None:
            expires = now + ttl
        self._store(key, str(value).encode(), expires, now)
        return value

    async def take(self, key: str, rate: float, burst: int, cost: int) -> Take:
        now = self._clock()
        entry = self._live(key, now)
        answer, stored, ttl = take_from_bucket(
            None if entry is None else entry[0], now, rate, burst, cost
        )
        if stored is not None:
            self._store(key, stored, now + ttl, now)
        return answer

    async def close(self) -> None:
        self._data.clear()
        self._deadlines.clear()
