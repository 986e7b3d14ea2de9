"""Conf tokens and the conf cache."""

from __future__ import annotations

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
