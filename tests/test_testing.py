"""runner.testing: plugins run through the runner's own code, with only the gateway faked."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runner.plugin import ConfigError, Plugin, Request, Response
from runner.server.lifecycle import BLOCKING_THREADS
from runner.state import open_state
from runner.testing import (
    CallTimeout,
    PluginConfigError,
    Rewrite,
    Stop,
    prepare,
    run_request,
    run_request_async,
    run_response,
)


@dataclass(frozen=True)
class Limits:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ConfigError("low", "must not exceed high")


@dataclass(frozen=True)
class EchoConfig:
    greeting: str
    limits: Limits = field(default_factory=Limits)


class Echo(Plugin[EchoConfig]):
    """Stops with what it read of the request."""

    name = "echo"

    async def on_request(self, request: Request) -> None:
        addr = await request.var("remote_addr")
        again = await request.var("remote_addr")
        assert addr == again
        body = await request.body()
        request.stop(
            201,
            f"{self.config.greeting} {request.method} {request.path} {addr} {body!r}",
            [("x-a", "1"), ("x-a", "2")],
        )


class Marker(Plugin[None]):
    """Records that it ran, and rewrites a little of everything."""

    name = "marker"

    def __init__(self, config: None) -> None:
        super().__init__(config)
        self.calls = 0

    def on_request(self, request: Request) -> None:
        self.calls += 1
        request.set_path("/v2" + request.path)
        request.headers.set("x-marked", "yes")
        request.headers.delete("cookie")
        request.args.add("page", "2")
        request.args.delete("debug")
        request.response_headers.set("x-served-by", "marker")


class Inspect(Plugin[None]):
    """Reads the request's typed view into the instance, for the test to look at."""

    name = "inspect"

    def __init__(self, config: None) -> None:
        super().__init__(config)
        self.seen: dict[str, object] = {}

    async def on_request(self, request: Request) -> None:
        self.seen = {
            "src_ip": request.src_ip,
            "ua": request.headers.get("User-Agent"),
            "accept": request.headers.getall("ACCEPT"),
            "a": request.args.getall("a"),
            "flag": request.args.getall("flag"),
            "empty": request.args.get("empty"),
            "missing_var": await request.var("nope"),
            "empty_var": await request.var("empty"),
            "body": await request.body(),
        }


class Raises(Plugin[None]):
    name = "raises"

    def on_request(self, request: Request) -> None:
        raise KeyError("no such user")


class Hangs(Plugin[None]):
    name = "hangs"

    async def on_request(self, request: Request) -> None:
        await asyncio.Event().wait()


class Blocks(Plugin[None]):
    """Blocking code in a worker thread, asking the gateway through run_sync."""

    name = "blocks"
    blocking = True

    def on_request(self, request: Request) -> None:
        addr = request.run_sync(request.var("remote_addr"))
        request.headers.set("x-thread", threading.current_thread().name.split("_")[0])
        request.headers.set("x-addr", str(addr))


class Tidy(Plugin[None]):
    """Post-response: a new status, a header and a body."""

    name = "tidy"

    async def on_response(self, response: Response) -> None:
        body = await response.body() or b""
        response.set_status(202)
        response.headers.set("x-tidy", "1")
        response.set_body(body.upper())


# -------------------------------------------------------------------------- prepare


def test_prepare_checks_the_config_as_prepare_conf_does() -> None:
    plugin = prepare(Echo, {"greeting": "hi", "limits": {"high": 3}})
    assert plugin.config == EchoConfig("hi", Limits(0, 3))
    assert prepare(Echo, '{"greeting": "raw json"}').config.greeting == "raw json"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "plugin 'echo': field 'greeting': required field is missing"),
        ({"greeting": 1}, "field 'greeting': expected a string, got a number"),
        ("", "invalid JSON"),
        ({"greeting": "x", "colour": "red"}, "field 'colour': unknown field"),
        ({"greeting": "x", "limits": {"low": 5, "high": 1}}, "field 'limits.low': must not"),
        ("{not json", "invalid JSON"),
    ],
)
def test_a_bad_config_is_rejected_naming_the_field(config: object, message: str) -> None:
    with pytest.raises(PluginConfigError) as info:
        prepare(Echo, config)
    assert message in str(info.value)


def test_a_plugin_without_config_is_prepared_with_none() -> None:
    assert prepare(Marker).config is None
    with pytest.raises(PluginConfigError, match="takes no config"):
        prepare(Marker, {"x": 1})


# ---------------------------------------------------------------------- request phase


def test_a_stop_reaches_the_gateway_with_status_headers_and_body() -> None:
    result = run_request(
        prepare(Echo, {"greeting": "hello"}),
        method="POST",
        path="/items",
        src_ip="10.1.2.3",
        body=b"payload",
    )
    assert result.stop == Stop(
        201, (("x-a", "1"), ("x-a", "2")), b"hello POST /items 10.1.2.3 b'payload'"
    )
    assert result.stop.header("X-A") == "1"
    # Asked once each: the second var() was answered from the call's cache.
    assert result.asked == [("var", "remote_addr"), ("req_body", None)]


def test_a_stop_ends_the_chain() -> None:
    marker = prepare(Marker)
    result = run_request([prepare(Echo, {"greeting": "hi"}), marker])
    assert result.stop.status == 201
    assert marker.calls == 0


def test_a_rewrite_carries_only_what_changed() -> None:
    result = run_request(
        prepare(Marker),
        path="/items",
        headers=[("Cookie", "a=1"), ("Accept", "*/*")],
        args="debug&q=x",
    )
    assert result.rewrite == Rewrite(
        path="/v2/items",
        headers=(("x-marked", "yes"), ("cookie", None)),
        args=(("page", "2"), ("debug", None)),
        resp_headers=(("x-served-by", "marker"),),
        body=None,
    )
    # The request as a next plugin in the chain would see it.
    assert result.request.path == "/v2/items"
    assert result.request.args.items() == [("q", "x"), ("page", "2")]


def test_a_chain_passes_changes_along_in_order() -> None:
    first, second = prepare(Marker), prepare(Marker)
    result = run_request([first, second], path="/a")
    assert result.rewrite.path == "/v2/v2/a"
    assert (first.calls, second.calls) == (1, 1)


def test_an_untouched_request_passes_and_the_wrong_expectation_explains_itself() -> None:
    result = run_request(prepare(Inspect))
    assert result.passed
    assert result.action is None
    with pytest.raises(AssertionError, match="it passed through unchanged"):
        _ = result.stop
    stopped = run_request(prepare(Echo, {"greeting": "hi"}))
    with pytest.raises(AssertionError, match="it was stopped with 201"):
        _ = stopped.rewrite


def test_the_request_view_is_typed_and_keeps_the_gateway_distinctions() -> None:
    plugin = prepare(Inspect)
    run_request(
        plugin,
        src_ip="2001:db8::1",
        headers=[("user-agent", "curl"), ("Accept", "text/html"), ("accept", "*/*")],
        args="a=1&flag&empty=&a=two+words",
        vars={"empty": ""},
        body=None,
    )
    assert plugin.seen == {
        "src_ip": ipaddress.IPv6Address("2001:db8::1"),
        "ua": "curl",
        "accept": ["text/html", "*/*"],
        "a": ["1", "two words"],
        "flag": [None],
        "empty": "",
        "missing_var": None,
        "empty_var": "",
        "body": None,
    }


def test_args_and_headers_may_be_given_as_dicts() -> None:
    plugin = prepare(Inspect)
    run_request(plugin, headers={"Accept": "a/b"}, args={"a": "1", "flag": None})
    assert plugin.seen["accept"] == ["a/b"]
    assert plugin.seen["flag"] == [None]


def test_a_plugin_that_raises_raises_in_the_test_with_the_consequence_noted() -> None:
    with pytest.raises(KeyError, match="no such user") as info:
        run_request(prepare(Raises))
    assert any("the gateway would answer 503" in note for note in info.value.__notes__)


def test_a_plugin_that_hangs_fails_at_the_call_deadline() -> None:
    with pytest.raises(CallTimeout, match=r"within the 0\.05 s call deadline"):
        run_request(prepare(Hangs), call_timeout=0.05)


def test_a_blocking_plugin_runs_in_a_thread_and_can_ask_the_gateway() -> None:
    result = run_request(prepare(Blocks), src_ip="192.0.2.7")
    headers = dict(result.rewrite.headers)
    assert headers["x-addr"] == "192.0.2.7"
    # The runner's own pool for blocking plugins, not asyncio's default executor.
    assert headers["x-thread"] == BLOCKING_THREADS


def test_plain_hooks_before_and_after_an_async_one_run_in_route_order() -> None:
    first, last = prepare(Marker), prepare(Inspect)
    result = run_request([first, prepare(Inspect), last], path="/a", args="q=1")
    assert first.calls == 1
    assert last.seen  # the chain went on past the async plugin
    assert result.rewrite.path == "/v2/a"
    assert result.request.path == "/v2/a"


def test_inputs_the_gateway_cannot_send_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot send method 'BREW'"):
        run_request(prepare(Marker), method="BREW")
    with pytest.raises(TypeError, match=r"use prepare\(PluginClass, config\)"):
        run_request(Marker)  # type: ignore[arg-type]


async def test_in_an_async_test_the_async_variant_is_used() -> None:
    result = await run_request_async(prepare(Echo, {"greeting": "hi"}))
    assert result.stop.status == 201
    with pytest.raises(RuntimeError, match="await run_request_async"):
        run_request(prepare(Marker))


# --------------------------------------------------------------------- response phase


def test_a_response_change_is_reported_as_the_gateway_and_the_client_see_it() -> None:
    result = run_response(
        prepare(Tidy),
        status=200,
        headers=[
            ("Content-Type", "text/plain"),
            ("Content-Length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ],
        body=b"hello",
    )
    assert (result.status, result.body) == (202, b"HELLO")
    # A replaced body must not travel with the upstream's length or framing headers.
    assert result.headers == (
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("x-tidy", "1"),
    )
    assert result.client_status == 202
    assert result.client_body == b"HELLO"
    assert result.header("content-type") == "text/plain"
    assert result.asked == [("resp_body", None)]


def test_an_unchanged_response_keeps_the_upstreams_minus_what_the_gateway_drops() -> None:
    result = run_response(
        prepare(Marker),  # no on_response: nothing changes
        status=404,
        headers={"content-type": "text/html", "x-upstream": "1"},
        body="not found",
    )
    assert not result.changed
    assert (result.status, result.headers, result.body) == (0, (), None)
    assert result.client_status == 404
    assert result.client_headers == (("x-upstream", "1"),)
    assert result.client_body == b"not found"


def test_the_guides_testing_example_runs_as_written() -> None:
    # docs/plugin-guide.md shows plugin authors how to test; its example must pass.
    guide = (Path(__file__).parent.parent / "docs" / "plugin-guide.md").read_text()
    section = guide.split("## 4. Testing plugins", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "plugin-guide.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()


def test_the_guides_shared_state_example_counts_across_instances() -> None:
    # docs/plugin-guide.md's shared-state plugin, as written, on one store for two
    # instances of one route (two workers) and one of another route.
    guide = (Path(__file__).parent.parent / "docs" / "plugin-guide.md").read_text()
    section = guide.split("### Shared state", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "plugin-guide.md", "exec"), namespace)
    visits = namespace["Visits"]
    store = open_state("memory://")
    workers = [prepare(visits, store=store, route="route#1") for _ in range(2)]
    other_route = prepare(visits, store=store, route="route#2")
    seen = [run_request(plugin).request.headers.get("x-visits") for plugin in workers * 2]
    assert seen == ["1", "2", "3", "4"]
    assert run_request(other_route).request.headers.get("x-visits") == "1"


def test_a_plugin_made_without_the_runner_says_how_to_get_its_state() -> None:
    class Counter(Plugin[None]):
        name = "counter"

        async def on_request(self, request: Request) -> None:
            await self.state.incr("n")

    with pytest.raises(RuntimeError, match=r"runner.testing.prepare\(\)"):
        _ = Counter(None).state
    # The same class through prepare: a state of its own, in memory.
    assert run_request(prepare(Counter)).passed
