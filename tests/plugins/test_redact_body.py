"""``redact-body``: a request body transform (JSON field redaction)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
RedactBody = load_plugin(EXAMPLES / "redact_body.py")

JSON = {"content-type": "application/json; charset=utf-8"}


def test_named_fields_are_redacted_at_any_depth() -> None:
    plugin = prepare(RedactBody, {"fields": ["password", "card"]})
    body = {"user": "al", "password": "pw", "items": [{"card": "4111", "qty": 1}]}
    result = run_request(plugin, method="POST", headers=JSON, body=json.dumps(body))
    assert result.rewrite.body is not None
    assert json.loads(result.rewrite.body) == {
        "user": "al",
        "password": "[redacted]",
        "items": [{"card": "[redacted]", "qty": 1}],
    }
    assert result.asked == [("req_body", None)]


def test_the_replacement_is_configurable() -> None:
    plugin = prepare(RedactBody, {"fields": ["token"], "replacement": "***"})
    result = run_request(plugin, method="PUT", headers=JSON, body=b'{"token": "t"}')
    assert result.rewrite.body == b'{"token":"***"}'


def test_a_body_without_those_fields_is_not_rewritten() -> None:
    plugin = prepare(RedactBody, {"fields": ["password"]})
    assert run_request(plugin, method="POST", headers=JSON, body=b'{"user": "al"}').passed


def test_other_content_types_are_not_even_read() -> None:
    plugin = prepare(RedactBody, {"fields": ["password"]})
    result = run_request(
        plugin, method="POST", headers={"content-type": "text/plain"}, body=b'{"password": 1}'
    )
    assert result.passed
    assert result.asked == []


@pytest.mark.parametrize("body", [None, b"", b"{not json", b"x" * 100])
def test_missing_broken_or_oversized_bodies_pass_untouched(body: bytes | None) -> None:
    plugin = prepare(RedactBody, {"fields": ["password"], "max_body": 50})
    assert run_request(
        plugin, method="POST", headers={"Content-Type": "application/JSON"}, body=body
    ).passed


def test_fields_are_required() -> None:
    with pytest.raises(PluginConfigError, match="field 'fields': required field is missing"):
        prepare(RedactBody, {})
