"""Conf tokens and the conf cache."""

from __future__ import annotations

import pytest

from runner.core.cache import ConfCache, TokenIssuer


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_token_lives_its_ttl_then_reads_as_missing() -> None:
    clock = FakeClock()
    cache: ConfCache[str] = ConfCache(ttl=3900, maxsize=10, timer=clock)
    token = cache.put("route 1")
    clock.now += 3899
    assert cache.get(token) == "route 1"
    clock.now += 2
    assert cache.get(token) is None


def test_the_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache: ConfCache[int] = ConfCache(ttl=100, maxsize=3, timer=FakeClock())
    tokens = [cache.put(i) for i in range(3)]
    cache.get(tokens[0])  # used: survives
    newest = cache.put(3)
    assert len(cache) == 3
    assert cache.get(tokens[0]) == 0
    assert cache.get(tokens[1]) is None
    assert cache.get(newest) == 3


def test_lookup_reads_like_the_ttl_cache_through_expiry_refresh_and_eviction() -> None:
    # lookup is what every call uses: the same answers as the TTLCache gives.
    clock = FakeClock()
    cache: ConfCache[str] = ConfCache(ttl=100, maxsize=3, timer=clock)
    a, b, c = (cache.put(name) for name in "abc")
    assert [cache.lookup(t) for t in (a, b, c)] == ["a", "b", "c"]
    clock.now += 60
    cache.refresh(a, "a2")
    clock.now += 50  # b and c are past their 100 s; a was refreshed 50 s ago
    assert cache.lookup(a) == "a2"
    for gone in (b, c):
        with pytest.raises(KeyError):
            cache.lookup(gone)
    assert len(cache) == 1
    cache.clear()
    with pytest.raises(KeyError):
        cache.lookup(a)
    with pytest.raises(KeyError):
        cache.lookup(12345)


def test_lookups_count_as_use_when_the_cache_must_evict() -> None:
    cache: ConfCache[int] = ConfCache(ttl=100, maxsize=3, timer=FakeClock())
    tokens = [cache.put(i) for i in range(3)]
    assert cache.lookup(tokens[0]) == 0  # used: survives
    newest = cache.put(3)
    assert cache.lookup(tokens[0]) == 0
    with pytest.raises(KeyError):
        cache.lookup(tokens[1])  # the least recently used
    assert cache.lookup(tokens[2]) == 2
    assert cache.lookup(newest) == 3
    # All three were used since that eviction: one of them goes now.
    last = cache.put(4)
    assert len(cache) == 3
    assert cache.lookup(last) == 4


def test_confs_dropped_by_the_cache_leave_no_trace_behind() -> None:
    clock = FakeClock()
    cache: ConfCache[int] = ConfCache(ttl=10, maxsize=50, timer=clock)
    for i in range(1000):
        token = cache.put(i)
        assert cache.lookup(token) == i
        clock.now += 1
    assert len(cache) == 9  # put at 991..999; the one put at 990 expired at 1000
    confs = cache._items
    assert set(confs.front) == set(confs.keys())
    assert confs.used <= set(confs.keys())


class _Shared:
    """Another worker's confs."""

    def __init__(self) -> None:
        self.confs: dict[int, str] = {}
        self.loads = 0

    def claim(self, token: int, conf: str) -> bool:
        return self.confs.setdefault(token, conf) == conf

    def touch(self, token: int, conf: str) -> None:
        self.confs[token] = conf

    def load(self, token: int) -> str:
        self.loads += 1
        return self.confs[token]


def test_a_token_of_another_worker_is_loaded_once_then_read_like_our_own() -> None:
    shared = _Shared()
    shared.confs[77] = "theirs"
    cache: ConfCache[str] = ConfCache(ttl=100, maxsize=10, timer=FakeClock(), shared=shared)
    assert [cache.lookup(77) for _ in range(3)] == ["theirs"] * 3
    assert shared.loads == 1
    with pytest.raises(KeyError):
        cache.lookup(78)


def test_tokens_are_distinct_and_never_zero() -> None:
    cache: ConfCache[int] = ConfCache(ttl=100, maxsize=100_000, timer=FakeClock())
    tokens = [cache.put(i) for i in range(20_000)]
    assert len(set(tokens)) == len(tokens)
    assert 0 not in tokens


def test_a_restarted_runner_never_reissues_a_token_of_its_earlier_life() -> None:
    # Both lives read the same host-wide monotonic clock; the second starts later.
    clock_us = [5_000_000]
    first = TokenIssuer(lambda: clock_us[0])
    earlier = {first.issue(lambda t: False) for _ in range(50_000)}  # a burst, faster than 1/us
    clock_us[0] += 3_000_000  # the gateway respawns the runner 3 s later
    second = TokenIssuer(lambda: clock_us[0])
    later = {second.issue(lambda t: False) for _ in range(50_000)}
    assert earlier.isdisjoint(later)


def test_tokens_skip_zero_and_those_still_in_use_when_the_space_wraps() -> None:
    clock_us = [(1 << 32) - 2]
    issuer = TokenIssuer(lambda: clock_us[0])
    in_use = {1, 2}
    got = [issuer.issue(in_use.__contains__) for _ in range(3)]
    assert got == [(1 << 32) - 2, (1 << 32) - 1, 3]
