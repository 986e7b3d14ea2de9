"""``request-info``: gateway variables (asked over ExtraInfo) into request headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
RequestInfo = load_plugin(EXAMPLES / "request_info.py")


def test_by_default_the_client_address_is_passed_upstream() -> None:
    result = run_request(prepare(RequestInfo), src_ip="203.0.113.9")
    assert result.rewrite.headers == (("x-client-addr", "203.0.113.9"),)


def test_each_configured_variable_becomes_a_header_and_missing_ones_are_skipped() -> None:
    plugin = prepare(
        RequestInfo,
        {"vars": {"x-port": "server_port", "x-nothing": "no_such_var", "x-empty": "empty_var"}},
    )
    result = run_request(plugin, vars={"server_port": "9080", "empty_var": ""})
    assert result.rewrite.headers == (("x-port", "9080"), ("x-empty", ""))
    assert result.asked == [("var", "server_port"), ("var", "no_such_var"), ("var", "empty_var")]


def test_the_body_length_can_be_sent_too() -> None:
    plugin = prepare(RequestInfo, {"vars": {}, "body_length_header": "x-body-length"})
    assert run_request(plugin, body=b"12345").rewrite.headers == (("x-body-length", "5"),)
    assert run_request(plugin).rewrite.headers == (("x-body-length", "0"),)


def test_vars_must_map_header_names_to_variable_names() -> None:
    with pytest.raises(PluginConfigError, match=r"field 'vars\.x-port': expected a string"):
        prepare(RequestInfo, {"vars": {"x-port": 9080}})
