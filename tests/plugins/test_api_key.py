"""``api-key``: authentication answering 401 and 403."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
ApiKey = load_plugin(EXAMPLES / "api_key.py")

KEYS = {"keys": ["s3cret", "other-key"]}


def test_no_key_is_401_with_a_challenge() -> None:
    stop = run_request(prepare(ApiKey, KEYS)).stop
    assert stop.status == 401
    assert stop.header("www-authenticate") == 'ApiKey header="x-api-key"'
    assert stop.json() == {"error": "missing API key"}


def test_an_unknown_key_is_403() -> None:
    stop = run_request(prepare(ApiKey, KEYS), headers={"x-api-key": "guess"}).stop
    assert stop.status == 403
    assert stop.header("content-type") == "application/json"


@pytest.mark.parametrize("key", ["s3cret", "other-key"])
def test_a_known_key_passes_and_the_upstream_never_sees_it(key: str) -> None:
    result = run_request(prepare(ApiKey, KEYS), headers={"X-API-Key": key, "accept": "*/*"})
    assert result.rewrite.headers == (("x-api-key", None),)


def test_the_key_can_be_left_for_the_upstream() -> None:
    plugin = prepare(ApiKey, {**KEYS, "hide_credential": False})
    assert run_request(plugin, headers={"x-api-key": "s3cret"}).passed


def test_the_header_name_is_configurable() -> None:
    plugin = prepare(ApiKey, {**KEYS, "header": "authorization"})
    assert run_request(plugin, headers={"x-api-key": "s3cret"}).stop.status == 401
    result = run_request(plugin, headers={"Authorization": "s3cret"})
    assert result.rewrite.headers == (("authorization", None),)


def test_a_later_plugin_does_not_run_for_a_refused_request() -> None:
    from plugins.say import Say

    result = run_request([prepare(ApiKey, KEYS), prepare(Say, {"body": "secret data"})])
    assert result.stop.status == 401


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "field 'keys': required field is missing"),
        ({"keys": []}, "field 'keys': give at least one non-empty key"),
        ({"keys": [""]}, "field 'keys': give at least one non-empty key"),
        ({"keys": "s3cret"}, "field 'keys': expected an array"),
    ],
)
def test_a_config_that_would_fail_open_is_rejected(config: object, message: str) -> None:
    with pytest.raises(PluginConfigError, match=message):
        prepare(ApiKey, config)
