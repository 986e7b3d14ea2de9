"""The conf cache: conf token -> prepared plugin chain, with a TTL and a size bound."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from cachetools import TTLCache

from runner.core.metrics import Metrics

T = TypeVar("T")

# The gateway keeps a token at most APISIX_CONF_EXPIRE_TIME seconds (its LRU cache TTL;
# its shared dict keeps it 0.9 of that), so we must keep a conf at least that long after
# its PrepareConf, plus a margin: a call in flight at the very end of the token's life,
# clocks that tick a little differently. The contract also wants an unused conf gone
# within about twice the expire time. A fixed margin cannot serve both: 300 s is right
# for the 3600 s the gateway uses, but with the short expire times of tests (2 s) it
# would keep confs 150 times too long. So the margin is the expire time itself (the conf
# lives twice as long), capped at this many seconds for long expire times.
CONF_TTL_MARGIN_CAP = 300.0


def conf_ttl(expire_time: float) -> float:
    """How long a prepared conf is kept for the gateway's ``expire_time``."""
    return expire_time + min(expire_time, CONF_TTL_MARGIN_CAP)


_TOKEN_SPACE = 1 << 32


class TokenIssuer:
    """Issues conf tokens that are never 0 and never repeat within one boot of the host.

    Tokens follow CLOCK_MONOTONIC in microseconds (mod 2**32), and each is at least one
    more than the last. The clock is shared by every process on the host, so a runner
    restarted after a crash starts above every token its earlier life issued (no runner
    issues a million confs a second), and a stale token still cached by the gateway can
    only be unknown to us, never another route's chain. The space wraps every ~71
    minutes; tokens still in use are skipped.
    """

    def __init__(self, clock_us: Callable[[], int] | None = None) -> None:
        self._clock_us = clock_us or (lambda: time.monotonic_ns() // 1000)
        self._last = self._clock_us() - 1

    def issue(self, in_use: Callable[[int], bool]) -> int:
        value = max(self._last + 1, self._clock_us())
        while True:
            token = value % _TOKEN_SPACE
            if token != 0 and not in_use(token):
                self._last = value
                return token
            value += 1


class SharedConfs(Protocol[T]):
    """Confs shared by the worker processes of one runner (``runner.core.confstore``).

    A worker's ConfCache writes each new conf here before its token is replied, and reads
    here the tokens it does not hold itself (prepared by another worker, or before a
    restart of this one).
    """

    def claim(self, token: int, conf: T) -> bool:
        """Store ``conf`` under ``token`` if no other conf holds it; False if one does."""
        ...

    def touch(self, token: int, conf: T) -> None:
        """Restart the lifetime of ``token`` (a re-prepare of the same conf)."""
        ...

    def load(self, token: int) -> T:
        """The conf of ``token``, ready to serve; KeyError if it is unknown or expired."""
        ...


class _CountingTTLCache(TTLCache[int, T]):
    """A TTLCache that counts the confs it drops into ``evictions`` (the runner's
    metrics): "expired" ones and, beyond maxsize, "size" ones. Only writes (a
    PrepareConf, a conf loaded from the shared store) expire or evict: lookups cost
    what they cost in a plain TTLCache."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        evictions: dict[str, int] | None = None,
    ) -> None:
        super().__init__(maxsize=maxsize, ttl=ttl, timer=timer)
        self._evictions = evictions

    def expire(self, time: Any = None) -> Any:
        expired = super().expire(time)
        if expired and self._evictions is not None:
            self._evictions["expired"] += len(expired)
        return expired

    def popitem(self) -> tuple[int, T]:
        item = super().popitem()
        if self._evictions is not None:
            self._evictions["size"] += 1
        return item


class _SharedTTLCache(_CountingTTLCache[T]):
    """A TTLCache that looks a token it does not hold up in the shared confs, and keeps
    what it found. Hits cost what they cost in a plain TTLCache."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        shared: SharedConfs[T],
        evictions: dict[str, int] | None = None,
    ) -> None:
        super().__init__(maxsize, ttl, timer, evictions)
        self._shared = shared

    def __missing__(self, token: int) -> T:
        conf = self._shared.load(token)
        self[token] = conf
        return conf


class ConfCache(Generic[T]):
    """Prepared confs by token, in a ``cachetools.TTLCache``: a token lives ``ttl``
    seconds from when it was stored (or refreshed) and, beyond ``maxsize`` tokens, the
    least recently used goes first. Expired or evicted tokens read as missing.

    (A pair of plain dicts with the same behaviour measured 0.16 us per lookup against
    TTLCache's 0.98 us; the project's design names cachetools, so it stays.)
    """

    def __init__(
        self,
        ttl: float,
        maxsize: int,
        timer: Callable[[], float] = time.monotonic,
        issuer: TokenIssuer | None = None,
        shared: SharedConfs[T] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._items: TTLCache[int, T]
        evictions = metrics.conf_evictions if metrics is not None else None
        if shared is not None:
            self._items = _SharedTTLCache(maxsize, ttl, timer, shared, evictions)
        elif evictions is not None:
            self._items = _CountingTTLCache(maxsize, ttl, timer, evictions)
        else:
            self._items = TTLCache(maxsize=maxsize, ttl=ttl, timer=timer)
        if metrics is not None:
            # currsize, not len(): a scrape may read it from another thread, and len()
            # would expire entries there.
            metrics.confs_held = lambda: int(self._items.currsize)
        self._shared = shared
        # The conf of a token; KeyError if it is unknown, expired or evicted. The
        # TTLCache's own lookup, for the hot path: get() is one call more per request.
        self.lookup: Callable[[int], T] = self._items.__getitem__
        self._issuer = issuer or TokenIssuer()
        self.ttl = ttl
        self.maxsize = maxsize

    def put(self, conf: T) -> int:
        """Store a conf under a new token and return the token."""
        token = self._issuer.issue(self._items.__contains__)
        # Another worker may have issued the same token (its clock read the same
        # microsecond): the shared store arbitrates, and the loser takes the next one.
        while self._shared is not None and not self._shared.claim(token, conf):
            token = self._issuer.issue(self._items.__contains__)
        self._items[token] = conf
        return token

    def refresh(self, token: int, conf: T) -> None:
        """Store again under an existing token, restarting its lifetime."""
        if self._shared is not None:
            self._shared.touch(token, conf)
        self._items[token] = conf

    def get(self, token: int) -> T | None:
        # Indexing, not TTLCache.get: that checks the TTL twice (in and [] each do).
        try:
            return self._items[token]
        except KeyError:
            return None

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        self._items.expire()
        return len(self._items)
