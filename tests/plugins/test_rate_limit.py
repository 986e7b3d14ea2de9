"""``rate-limit``: in-memory state per route, keyed by a gateway variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
RateLimit = load_plugin(EXAMPLES / "rate_limit.py")


def test_requests_over_the_burst_get_429_with_retry_after() -> None:
    plugin = prepare(RateLimit, {"rate": 0.5, "burst": 2})
    assert run_request(plugin, src_ip="10.0.0.1").passed
    assert run_request(plugin, src_ip="10.0.0.1").passed
    stop = run_request(plugin, src_ip="10.0.0.1").stop
    assert stop.status == 429
    assert stop.header("retry-after") == "2"


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
    plugin = prepare(RateLimit, {"rate": 2, "burst": 1})
    # The bucket logic takes the clock as an argument: no sleeping in tests.
    assert plugin.take("c", now=100.0)
    assert not plugin.take("c", now=100.1)
    assert plugin.take("c", now=100.6)


def test_the_least_recently_seen_clients_are_forgotten_beyond_max_clients() -> None:
    plugin = prepare(RateLimit, {"rate": 0.001, "max_clients": 2})
    assert plugin.take("a", 0.0)
    assert plugin.take("b", 0.0)
    assert plugin.take("c", 0.0)  # "a" is dropped to make room
    assert plugin.take("a", 0.0)
    assert not plugin.take("c", 0.0)


def test_routes_do_not_share_state() -> None:
    route_1, route_2 = prepare(RateLimit, {"rate": 0.001}), prepare(RateLimit, {"rate": 0.001})
    assert run_request(route_1).passed
    assert run_request(route_2).passed


@pytest.mark.parametrize(
    ("config", "field"),
    [({}, "rate"), ({"rate": 0}, "rate"), ({"rate": 1, "burst": 0}, "burst"),
     ({"rate": 1, "status": 200.5}, "status"), ({"rate": 1, "status": 42}, "status")],
)  # fmt: skip
def test_a_bad_config_is_rejected_naming_the_field(config: object, field: str) -> None:
    with pytest.raises(PluginConfigError, match=f"field '{field}'"):
        prepare(RateLimit, config)
