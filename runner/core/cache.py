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


class _Confs(TTLCache[int, T]):
    """The TTLCache behind a ConfCache, with a plain dict in front of it for lookups.

    ``front`` holds each conf with the time it expires, computed just before the
    TTLCache stores it (so never later than the TTLCache's own): a lookup is one dict
    read and one clock read, against four Python calls through the TTLCache. Entries
    leave ``front`` whenever they leave the TTLCache (expired, evicted, cleared).
    Lookups served by ``front`` are noted in ``used``; before the TTLCache evicts for
    size, it is told of them, so that the least recently used still goes first.

    Also: the confs it drops are counted into ``evictions`` ("expired", and "size"
    beyond maxsize), and a token it does not hold is looked up in ``shared`` (the
    confs of the other workers) and kept.
    """

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        evictions: dict[str, int] | None,
        shared: SharedConfs[T] | None,
    ) -> None:
        super().__init__(maxsize=maxsize, ttl=ttl, timer=timer)
        self.clock = timer
        self.front: dict[int, tuple[T, float]] = {}
        self.used: set[int] = set()
        self._evictions = evictions
        self._shared = shared

    def __setitem__(self, token: int, conf: T) -> None:
        expires = self.clock() + self.ttl
        super().__setitem__(token, conf)
        self.front[token] = (conf, expires)

    def __delitem__(self, token: int) -> None:
        try:
            super().__delitem__(token)  # (raises KeyError, once deleted, if expired)
        finally:
            self.front.pop(token, None)
            self.used.discard(token)

    def __missing__(self, token: int) -> T:
        if self._shared is None:
            raise KeyError(token)
        conf = self._shared.load(token)
        self[token] = conf
        return conf

    def expire(self, time: Any = None) -> Any:
        expired = super().expire(time)
        if expired:
            for token, _ in expired:
                self.front.pop(token, None)
                self.used.discard(token)
            if self._evictions is not None:
                self._evictions["expired"] += len(expired)
        return expired

    def popitem(self) -> tuple[int, T]:
        # The tokens looked up since the last eviction become the most recently used
        # (among themselves in no particular order), as a TTLCache lookup would have
        # made each. Only live ones: an expired one must not be loaded back here.
        used = self.used
        while used:
            token = used.pop()
            if token in self:
                super().__getitem__(token)
        item = super().popitem()
        if self._evictions is not None:
            self._evictions["size"] += 1
        return item

    def clear(self) -> None:
        super().clear()
        self.front.clear()
        self.used.clear()


class ConfCache(Generic[T]):
    """Prepared confs by token, in a ``cachetools.TTLCache``: a token lives ``ttl``
    seconds from when it was stored (or refreshed) and, beyond ``maxsize`` tokens, the
    least recently used goes first. Expired or evicted tokens read as missing.

    Lookups read a plain dict kept in step with the TTLCache (see ``_Confs``): a call
    pays one dict read and one clock read to find its conf.
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
        evictions = metrics.conf_evictions if metrics is not None else None
        self._items: _Confs[T] = _Confs(maxsize, ttl, timer, evictions, shared)
        if metrics is not None:
            # currsize, not len(): a scrape may read it from another thread, and len()
            # would expire entries there.
            metrics.confs_held = lambda: int(self._items.currsize)
        self._shared = shared
        self.lookup: Callable[[int], T] = _lookup_through(self._items)
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


def _lookup_through(confs: _Confs[T]) -> Callable[[int], T]:
    """``ConfCache.lookup``: the conf of a token; KeyError if it is unknown, expired or
    evicted (a closure over what it reads: the hot path, once per call)."""
    front = confs.front
    used = confs.used
    clock = confs.clock
    slow = confs.__getitem__

    def lookup(token: int) -> T:
        hit = front.get(token)
        if hit is not None and clock() < hit[1]:
            used.add(token)
            return hit[0]
        return slow(token)  # expired (it goes), or another worker's (it is loaded)

    return lookup
