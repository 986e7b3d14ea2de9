"""``say``: a Stop, the simplest plugin there is."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
Say = load_plugin(EXAMPLES / "say.py")


def test_by_default_it_answers_200_with_a_greeting() -> None:
    result = run_request(prepare(Say))
    assert result.stop.status == 200
    assert result.stop.text == "hello from a6-runner\n"


def test_status_headers_and_body_come_from_the_config() -> None:
    plugin = prepare(Say, {"status": 418, "body": "short and stout", "headers": {"x-tea": "1"}})
    stop = run_request(plugin, path="/teapot").stop
    assert (stop.status, stop.headers, stop.body) == (418, (("x-tea", "1"),), b"short and stout")


def test_the_gateway_never_asks_the_upstream_or_anything_else() -> None:
    result = run_request(prepare(Say), body=b"ignored")
    assert result.asked == []


@pytest.mark.parametrize(
    ("config", "field"),
    [({"status": 99}, "status"), ({"status": "200"}, "status"), ({"bdy": "x"}, "bdy")],
)
def test_a_bad_config_is_rejected_naming_the_field(config: dict[str, object], field: str) -> None:
    with pytest.raises(PluginConfigError, match=f"plugin 'say': field '{field}'"):
        prepare(Say, config)
