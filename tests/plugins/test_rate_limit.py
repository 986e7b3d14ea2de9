"""``rate-limit``: a token bucket per client and route in the shared state, keyed by a
gateway variable. (Several workers and runners on one state: tests/server/test_state.py.)"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from runner.state import open_state
from runner.testing import PluginConfigError, load_plugin, prepare, run_request
from tests.state.conftest import FakeClock

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
RateLimit = load_plugin(EXAMPLES / "rate_limit.py")


def test_requests_over_the_burst_get_429_with_retry_after() -> None:
    plugin = prepare(RateLimit, {"rate": 0.5, "burst": 2})
    assert run_request(plugin, src_ip="10.0.0.1").passed
    assert run_request(plugin, src_ip="10.0.0.1").passed
    stop = run_request(plugin, src_ip="10.0.0.1").stop
    assert stop.status == 429
    assert stop.header("retry-after") == "2"  # one token at 0.5 a second


def test_each_client_has_its_own_bucket() -> None:
    plugin = prepare(RateLimit, {"rate": 0.001})
    assert run_request(plugin, src_ip="10.0.0.1").passed
    assert run_request(plugin, src_ip="10.0.0.2").passed
    assert run_request(plugin, src_ip="10.0.0.1").stop.status == 429


def test_the_key_is_any_gateway_variable() -> None:
    plugin = prepare(RateLimit, {"rate": 0.001, "key": "http_x_user", "status": 503})
    result = run_request(plugin, vars={"http_x_user": "alice"})
    assert result.passed
    assert result.asked == [("var", "http_x_user")]
    # Another address, same user: the same bucket.
    assert run_request(plugin, src_ip="10.9.9.9", vars={"http_x_user": "alice"}).stop.status == 503
    assert run_request(plugin, vars={"http_x_user": "bob"}).passed


def test_tokens_come_back_at_the_configured_rate() -> None:
    clock = FakeClock()
    plugin = prepare(RateLimit, {"rate": 2, "burst": 1}, store=open_state("memory://", clock=clock))
    assert run_request(plugin).passed
    clock.advance(0.1)
    stop = run_request(plugin).stop
    assert stop.header("retry-after") == "1"  # 0.4 s to go, in whole seconds rounded up
    clock.advance(0.41)  # the token is back (0.4 s would leave it to float rounding)
    assert run_request(plugin).passed


def test_routes_count_apart_unless_they_name_one_group() -> None:
    store = open_state("memory://")
    route_1 = prepare(RateLimit, {"rate": 0.001}, store=store, route="route#1")
    route_2 = prepare(RateLimit, {"rate": 0.001}, store=store, route="route#2")
    assert run_request(route_1).passed
    assert run_request(route_2).passed
    assert run_request(route_1).stop.status == 429
    # The same route prepared again (another worker, another runner) shares its buckets.
    assert run_request(prepare(RateLimit, {"rate": 0.001}, store=store, route="route#1")).stop

    grouped = [
        prepare(RateLimit, {"rate": 0.001, "group": "api"}, store=store, route=f"route#{n}")
        for n in (3, 4)
    ]
    assert run_request(grouped[0]).passed
    assert run_request(grouped[1]).stop.status == 429


@pytest.mark.parametrize(
    ("choice", "passes"), [({}, True), ({"if_state_unavailable": "allow"}, True),
                           ({"if_state_unavailable": "deny"}, False)],
)  # fmt: skip
def test_without_its_state_the_plugin_fails_open_or_closed_as_configured(
    choice: dict[str, str], passes: bool, tmp_path: Path
) -> None:
    store = open_state(f"local://{tmp_path}/state.db?lock_timeout=0.01")
    # Another worker stopped in the middle of a write: the state cannot be had.
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        plugin = prepare(RateLimit, {"rate": 0.001, **choice}, store=store)
        for _ in range(3):  # more than the burst
            result = run_request(plugin)
            if passes:
                assert result.passed
            else:
                assert result.stop.status == 503
                assert result.stop.header("retry-after") is None
    finally:
        holder.rollback()
        holder.close()
        asyncio.run(store.close())


@pytest.mark.parametrize(
    ("config", "field"),
    [({}, "rate"), ({"rate": 0}, "rate"), ({"rate": 1, "burst": 0}, "burst"),
     ({"rate": 1, "status": 200.5}, "status"), ({"rate": 1, "status": 42}, "status"),
     ({"rate": 1, "if_state_unavailable": "maybe"}, "if_state_unavailable"),
     ({"rate": 1, "group": "a:b"}, "group"), ({"rate": 1, "max_clients": 5}, "max_clients")],
)  # fmt: skip
def test_a_bad_config_is_rejected_naming_the_field(config: object, field: str) -> None:
    with pytest.raises(PluginConfigError, match=f"field '{field}'"):
        prepare(RateLimit, config)
