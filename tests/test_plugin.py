"""runner.plugin: what a plugin author relies on in Request, Response, Headers and Args.

Reads are checked on the objects themselves; what reaches the gateway is checked through
runner.testing, which runs the runner's production path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

import runner.plugin
from runner.plugin import Args, Headers, Plugin, Request, Response, ResponseHeaders
from runner.testing import RequestResult, Rewrite, Stop, prepare, run_request, run_response

# ------------------------------------------------------------------ the public surface


def test_the_module_exports_the_plugin_api_and_nothing_wire_level() -> None:
    assert set(runner.plugin.__all__) == {
        "Args",
        "ConfigError",
        "Headers",
        "InfoSource",
        "Plugin",
        "Request",
        "Response",
        "ResponseHeaders",
        "State",
        "StateUnavailable",
        "Take",
    }
    for cls in (Request, Response, Headers, Args, Plugin):
        public = {name for name in dir(cls) if not name.startswith("_")}
        assert not public & {"encode_reply", "action", "reply", "rewrite_entries"}, cls
        assert not public & {"from_json", "handles_requests", "runs_inline", "summary"}, cls


# -------------------------------------------------------------------- Headers and Args


def test_header_names_are_case_insensitive_and_keep_every_value() -> None:
    headers = Headers([("Accept", "text/html"), ("X-Trace", "1"), ("accept", "*/*")])
    assert headers.get("ACCEPT") == "text/html"
    assert headers.getall("accept") == ["text/html", "*/*"]
    assert headers["x-trace"] == "1"
    assert "X-TRACE" in headers
    assert "x-missing" not in headers
    assert headers.get("x-missing", "default") == "default"
    with pytest.raises(KeyError):
        headers["x-missing"]
    assert list(headers) == ["Accept", "X-Trace"]  # each name once, first spelling
    assert len(headers) == 2


def test_setting_a_header_replaces_all_its_values_and_reads_back_at_once() -> None:
    headers = Headers([("Accept", "text/html"), ("accept", "*/*"), ("x-a", "1")])
    headers.set("ACCEPT", "application/json")
    assert headers.getall("accept") == ["application/json"]
    headers.delete("x-a")
    assert "x-a" not in headers
    assert headers.changed


def test_deleting_an_absent_header_is_no_change() -> None:
    headers = Headers([("x-a", "1")])
    headers.delete("x-b")
    assert not headers.changed


def test_arg_names_are_case_sensitive_and_a_flag_differs_from_an_empty_value() -> None:
    args = Args([("flag", None), ("empty", ""), ("Q", "upper"), ("q", "1"), ("q", "2")])
    assert args.get("flag") is None
    assert "flag" in args
    assert args.get("empty") == ""  # ?empty=
    assert args.getall("q") == ["1", "2"]
    assert args.get("Q") == "upper"
    args.add("q", "3")
    args.setall("Q", ["a", "b"])
    assert args.getall("q") == ["1", "2", "3"]
    assert args.getall("Q") == ["a", "b"]


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "a\0b"])
def test_header_and_arg_text_cannot_smuggle_line_breaks(bad: str) -> None:
    with pytest.raises(ValueError, match="must not contain"):
        Headers().set("x-a", bad)
    with pytest.raises(ValueError, match="must not contain"):
        Headers().set(bad, "1")
    with pytest.raises(ValueError, match="must not contain"):
        Args().set("a", bad)


def test_a_non_text_value_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        Headers().set("x-a", 1)  # type: ignore[arg-type]


def test_changes_read_the_same_whether_made_before_or_after_a_read() -> None:
    # The runner records a change without decoding the request's entries when nothing
    # was read yet; a plugin must not be able to tell.
    source = [("Host", "a"), ("x-a", "1"), ("host", "b"), ("x-b", "2")]
    untouched, read_first = Headers(list(source)), Headers(list(source))
    assert read_first.get("host") == "a"
    for headers in (untouched, read_first):
        headers.set("HOST", "c")
        headers.set("x-c", "3")
        headers.delete("x-a")
    assert untouched.items() == read_first.items()
    assert untouched.items() == [("x-b", "2"), ("HOST", "c"), ("x-c", "3")]


# --------------------------------------------------------------- Request, through testing


class Probe(Plugin[None]):
    """Runs one action given by the test on the request."""

    name = "probe"
    action: Callable[[Request], object] | None = None

    def on_request(self, request: Request) -> None:
        assert self.action is not None
        self.action(request)


def _run(action: Callable[[Request], object], **kwargs: object) -> RequestResult:
    plugin = prepare(Probe)
    plugin.action = action
    return run_request(plugin, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [99, 1000, 0])
def test_a_stop_needs_an_http_status(status: int) -> None:
    with pytest.raises(ValueError, match="status must be an HTTP status code"):
        _run(lambda request: request.stop(status))


def test_a_stop_sends_status_headers_and_body_and_drops_earlier_rewrites() -> None:
    def act(request: Request) -> None:
        request.headers.set("x-dropped", "1")
        request.stop(403, "no", {"x-why": "policy"})

    result = _run(act)
    assert result.action == Stop(403, (("x-why", "policy"),), b"no")


def test_repeated_stop_headers_all_reach_the_client() -> None:
    result = _run(
        lambda request: request.stop(302, headers=[("set-cookie", "a"), ("set-cookie", "b")])
    )
    assert result.stop.headers == (("set-cookie", "a"), ("set-cookie", "b"))


def test_a_stop_is_checked_and_sent_by_value_whatever_was_answered_before() -> None:
    # Answers are reused by value: the same values give the same reply, a dict changed
    # between calls gives the changed reply, and a bad value is refused every time.
    headers = {"content-type": "text/plain"}
    first = _run(lambda request: request.stop(200, "hi", headers))
    again = _run(lambda request: request.stop(200, "hi", {"content-type": "text/plain"}))
    assert first.action == again.action == Stop(200, (("content-type", "text/plain"),), b"hi")
    headers["content-type"] = "application/json"
    headers["x-more"] = "1"
    changed = _run(lambda request: request.stop(200, "hi", headers))
    assert changed.stop.headers == (("content-type", "application/json"), ("x-more", "1"))
    assert _run(lambda request: request.stop(200, b"hi", headers)).stop.body == b"hi"
    headers["x-bad"] = "a\r\nb"
    for _ in range(2):
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            _run(lambda request: request.stop(200, "hi", headers))
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            _run(lambda request: request.stop(200, "hi", (("x-bad", "\n"),)))
    pairs = (("x-a", "1"), ("x-a", "2"))
    for _ in range(2):
        assert _run(lambda request: request.stop(204, b"", pairs)).stop.headers == pairs


@pytest.mark.parametrize("status", [200.0, True, "200"])
def test_a_stop_status_must_be_an_int_even_after_the_same_answer_as_an_int(
    status: object,
) -> None:
    assert _run(lambda request: request.stop(200, "same")).stop.status == 200
    with pytest.raises(ValueError, match="status must be an HTTP status code"):
        _run(lambda request: request.stop(status, "same"))  # type: ignore[arg-type]


def test_answers_that_differ_every_time_are_all_sent_right() -> None:
    # More distinct answers than the runner keeps, and unhashable or large ones.
    for i in range(600):

        def act(request: Request, i: int = i) -> None:
            request.stop(200 + i % 3, f"n{i}", {"x-n": str(i)})

        result = _run(act)
        assert result.stop == Stop(200 + i % 3, (("x-n", str(i)),), f"n{i}".encode())
    assert len(runner.plugin._STOPS) <= runner.plugin._STOP_MEMO_SIZE
    big = "x" * (runner.plugin._STOP_MEMO_BODY + 1)
    assert _run(lambda request: request.stop(200, big)).stop.body == big.encode()
    assert _run(lambda request: request.stop(200, bytearray(b"ba"))).stop.body == b"ba"  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="header value must be a str, not list"):
        _run(lambda request: request.stop(200, "", {"x-l": ["v"]}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "message"),
    [("relative", "must start with '/'"), ("/a?b=1", "must not contain '?'"), ("/a\nb", "CR")],
)
def test_set_path_refuses_what_the_gateway_would_mangle(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(lambda request: request.set_path(path))


def test_set_path_reads_back_and_is_sent_without_the_query() -> None:
    seen: list[str] = []

    def act(request: Request) -> None:
        request.set_path("/v2/items")
        seen.append(request.path)

    result = _run(act, path="/items", args="q=1")
    assert seen == ["/v2/items"]
    assert result.rewrite == Rewrite(path="/v2/items")


def test_an_empty_request_body_cannot_be_set() -> None:
    with pytest.raises(ValueError, match="empty request body"):
        _run(lambda request: request.set_body(b""))


def test_response_headers_set_replaces_and_add_keeps() -> None:
    def act(request: Request) -> None:
        request.response_headers.set("x-a", "1")
        request.response_headers.add("x-a", "2")
        request.response_headers.set("x-b", "old")
        request.response_headers.set("X-B", "new")

    result = _run(act)
    assert result.rewrite.resp_headers == (
        ("x-a", "1"),
        ("x-a", "2"),
        ("X-B", "new"),
    )


@pytest.mark.parametrize("name", ["Content-Type", "content-length", "Location", "server"])
def test_response_headers_the_gateway_ignores_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="the gateway ignores response header"):
        _run(lambda request: request.response_headers.set(name, "x"))
    with pytest.raises(ValueError, match="the gateway ignores response header"):
        _run(lambda request: request.response_headers.add(name, "x"))


def test_an_unchanged_request_passes_through() -> None:
    def act(request: Request) -> None:
        assert request.headers.get("x-a") == "1"
        request.headers.delete("x-missing")
        assert request.method == "PUT"

    assert _run(act, method="PUT", headers={"x-a": "1"}).passed


def test_src_ip_is_an_address_object() -> None:
    seen: list[object] = []
    _run(lambda request: seen.append(request.src_ip), src_ip="2001:db8::1")
    assert str(seen[0]) == "2001:db8::1"


# ---------------------------------------------------------------------------- Response


@dataclass(frozen=True)
class Change:
    status: int = 0
    body: str = ""


class Changer(Plugin[Change]):
    name = "changer"

    async def on_response(self, response: Response) -> None:
        assert response.upstream_status == 500
        if self.config.status:
            response.set_status(self.config.status)
            assert response.status == self.config.status
        if self.config.body:
            response.set_body(self.config.body)
            assert await response.body() == self.config.body.encode()


def test_a_response_reads_its_new_status_and_body_back() -> None:
    result = run_response(prepare(Changer, {"status": 503, "body": "sorry"}), status=500)
    assert (result.status, result.body) == (503, b"sorry")


def test_response_headers_are_the_response_headers_type_and_keep_repeated_names() -> None:
    headers = ResponseHeaders([("Set-Cookie", "a=1")])
    headers.add("set-cookie", "b=2")
    assert headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    # The post-response phase may set any header: the request phase's refusals do not apply.
    headers.set("content-type", "text/plain")
    assert headers.get("Content-Type") == "text/plain"


@pytest.mark.parametrize("status", [99, 1000])
def test_a_response_status_must_be_an_http_status(status: int) -> None:
    with pytest.raises(ValueError, match="status must be an HTTP status code"):
        run_response(prepare(Changer, {"status": status}), status=500)
