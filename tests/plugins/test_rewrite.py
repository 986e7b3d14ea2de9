"""``rewrite``: header, arg and path manipulation (a Rewrite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
EXAMPLES = Path(__file__).parents[2] / "plugins"
Rewrite = load_plugin(EXAMPLES / "rewrite.py")


def test_an_empty_config_lets_the_request_pass_untouched() -> None:
    assert run_request(prepare(Rewrite), path="/a", headers={"x": "1"}, args="q=1").passed


def test_path_headers_and_response_headers_are_rewritten() -> None:
    plugin = prepare(
        Rewrite,
        {
            "path": "/internal/v2",
            "set_headers": {"x-gateway": "apisix", "host": "backend.internal"},
            "delete_headers": ["cookie"],
            "response_headers": {"x-served-by": "a6"},
        },
    )
    rewrite = run_request(plugin, path="/v1", headers={"Cookie": "s=1"}).rewrite
    assert rewrite.path == "/internal/v2"
    # host also changes the upstream host; None deletes the header.
    assert rewrite.headers == (
        ("x-gateway", "apisix"),
        ("host", "backend.internal"),
        ("cookie", None),
    )
    assert rewrite.resp_headers == (("x-served-by", "a6"),)


def test_deleting_a_header_the_request_lacks_sends_nothing() -> None:
    assert run_request(prepare(Rewrite, {"delete_headers": ["cookie"]})).passed


def test_args_are_set_added_and_deleted_with_the_gateways_merge_rules() -> None:
    plugin = prepare(
        Rewrite,
        {"set_args": {"page": "1"}, "add_args": {"tag": "new"}, "delete_args": ["debug"]},
    )
    result = run_request(plugin, args="page=7&tag=old&debug&keep=me")
    # The gateway merges: the first entry of a name replaces, the next ones append,
    # no value deletes. "keep" is not mentioned, so the gateway leaves it alone.
    assert result.rewrite.args == (
        ("page", "1"),
        ("tag", "old"),
        ("tag", "new"),
        ("debug", None),
    )
    args = result.request.args
    assert (args.getall("page"), args.getall("tag")) == (["1"], ["old", "new"])
    assert ("debug" in args, args.get("keep")) == (False, "me")


@pytest.mark.parametrize("path", ["relative", "/with?query"])
def test_a_path_the_gateway_would_mangle_is_rejected_at_prepare_conf(path: str) -> None:
    with pytest.raises(PluginConfigError, match="field 'path'"):
        prepare(Rewrite, {"path": path})


def test_a_response_header_the_gateway_would_drop_fails_loudly() -> None:
    plugin = prepare(Rewrite, {"response_headers": {"content-type": "text/plain"}})
    with pytest.raises(ValueError, match="the gateway ignores response header 'content-type'"):
        run_request(plugin)
