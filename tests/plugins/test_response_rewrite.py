"""``response-rewrite``: the post-response phase (ext-plugin-post-resp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_response

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
ResponseRewrite = load_plugin(EXAMPLES / "response_rewrite.py")

UPSTREAM = [("Content-Type", "text/html"), ("Server", "backend-7"), ("X-Debug", "on")]


def test_an_empty_config_changes_nothing() -> None:
    result = run_response(prepare(ResponseRewrite), status=200, headers=UPSTREAM, body="hi")
    assert not result.changed


def test_status_and_headers_are_changed_and_the_rest_of_the_headers_kept() -> None:
    plugin = prepare(
        ResponseRewrite,
        {"status": 203, "set_headers": {"server": "gateway"}, "delete_headers": ["x-debug"]},
    )
    result = run_response(plugin, status=200, headers=UPSTREAM, body=b"<p>hi</p>")
    assert result.status == 203
    # A non-empty list replaces every upstream header: the unchanged ones are re-sent.
    assert result.headers == (("Content-Type", "text/html"), ("server", "gateway"))
    assert result.body is None
    assert result.client_body == b"<p>hi</p>"
    assert result.asked == []  # no body rewrite configured: the body is never fetched


def test_body_text_is_replaced() -> None:
    plugin = prepare(ResponseRewrite, {"replace": {"backend-7.internal": "example.com"}})
    result = run_response(
        plugin,
        status=302,
        headers=[("Content-Length", "40")],
        body=b'<a href="http://backend-7.internal/x">',
    )
    assert result.body == b'<a href="http://example.com/x">'
    # Status 0 with a new body: the gateway keeps the upstream's status.
    assert (result.status, result.client_status) == (0, 302)


def test_a_body_without_the_text_is_left_alone() -> None:
    plugin = prepare(ResponseRewrite, {"replace": {"secret": "x"}})
    result = run_response(plugin, body=b"nothing to see")
    assert not result.changed
    assert result.asked == [("resp_body", None)]


def test_a_bad_config_is_rejected_naming_the_field() -> None:
    with pytest.raises(PluginConfigError, match="field 'status'"):
        prepare(ResponseRewrite, {"status": "teapot"})
