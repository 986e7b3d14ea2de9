"""Counts the metrics endpoint reports that come from the conf cache and from summing
workers: evictions by reason, and totals that survive a worker's death."""

from __future__ import annotations

import pytest

from runner.core.cache import ConfCache
from runner.core.metrics import Metrics, merge_snapshots, without_gauges


def test_confs_dropped_are_counted_as_expired_or_evicted_for_size() -> None:
    now = [0.0]
    metrics = Metrics()
    cache: ConfCache[str] = ConfCache(ttl=10, maxsize=2, timer=lambda: now[0], metrics=metrics)
    cache.put("a")
    cache.put("b")
    cache.put("c")  # over maxsize: the least recently used goes
    assert metrics.conf_evictions == {"size": 1, "expired": 0}
    assert metrics.snapshot()["gauges"]["confs_held"] == 2
    now[0] = 11.0
    cache.put("d")  # both others are past their lifetime
    assert metrics.conf_evictions == {"size": 1, "expired": 2}
    assert metrics.snapshot()["gauges"]["confs_held"] == 1


def test_a_dead_workers_counters_stay_in_the_sum_but_not_its_gauges() -> None:
    one, two = Metrics(), Metrics()
    one.count_call("http_req_call", "stop")
    two.count_call("http_req_call", "stop")
    two.count_call("http_req_call", "pass")
    one.plugin("say", "on_request").observe(0.00002)
    two.plugin("say", "on_request").observe(2.0)
    two.open_connections = lambda: 3
    retired = without_gauges(two.snapshot())
    total = merge_snapshots([retired, one.snapshot()])
    assert total["calls"]["http_req_call\0stop"] == 2
    assert total["calls"]["http_req_call\0pass"] == 1
    assert total["calls"]["http_req_call\0rewrite"] == 0
    buckets, seconds, failures = total["plugins"]["say\0on_request"]
    # 20 us falls in the 25 us bucket, 2 s in the 2.5 s one (then 5, 10 and +Inf).
    assert sum(buckets) == 2
    assert buckets[1] == 1
    assert buckets[-4] == 1
    assert seconds == pytest.approx(2.00002)
    assert failures == 0
    assert total["gauges"]["open_connections"] == 0
