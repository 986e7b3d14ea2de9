"""``route_namespace``: which prepared confs share a route's state (``Plugin.route_state``)."""

from __future__ import annotations

from runner.core.chain import route_namespace
from runner.state import open_state

CONF = (("rate-limit", '{"rate": 1}'),)


def test_one_conf_key_is_one_namespace_whatever_the_conf() -> None:
    key = "route#1#12#ext-plugin-pre-req"
    assert route_namespace(key, CONF) == route_namespace(key, ())
    assert route_namespace(key, CONF) != route_namespace("route#1#13#ext-plugin-pre-req", CONF)


def test_without_a_key_identical_confs_share_one_namespace() -> None:
    assert route_namespace("", CONF) == route_namespace("", CONF)
    assert route_namespace("", CONF) != route_namespace("", (("rate-limit", '{"rate": 2}'),))


def test_any_key_makes_a_usable_namespace() -> None:
    state = open_state("memory://").for_plugin("p")
    # ":" may not be in a namespace; a key that was not UTF-8 arrives with surrogates.
    for key in ("route:with:colons", "bad-\udcff-bytes", "x" * 10_000):
        assert state.namespace(route_namespace(key, ())).prefix.startswith("p:route-")
