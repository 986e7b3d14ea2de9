"""Unit-test plugins without a gateway or a socket.

Prepare a plugin with its config (checked exactly as at PrepareConf), run it, or a
chain of plugins, over a fake request or upstream response, and assert on what the
gateway would receive::

    from runner.testing import prepare, run_request

    def test_a_request_without_a_key_gets_401() -> None:
        plugin = prepare(ApiKey, {"keys": ["s3cret"]})
        result = run_request(plugin, headers={"accept": "*/*"})
        assert result.stop.status == 401

The request goes through the runner's own code: the fake call is encoded as the
gateway encodes it and decoded by the runner's decoder, the plugins run in the chain
code the server uses (inline, async or in a thread for ``blocking`` plugins, under the
call deadline), and the reply is encoded by the runner and decoded as the gateway
decodes it. Only the gateway itself is fake: it answers ``var()`` from ``vars`` and
``body()`` from ``body``, and records what it was asked in ``result.asked``.

``run_request`` and ``run_response`` run their own event loop; from an ``async def``
test, ``await run_request_async(...)`` / ``run_response_async(...)`` instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import unquote_plus

import uvloop

from runner.core.chain import (
    Chain,
    PluginFailed,
    run_request_inline,
    run_response_inline,
)
from runner.core.chain import (
    run_request as run_request_chain,
)
from runner.core.chain import (
    run_response as run_response_chain,
)
from runner.core.config import Config
from runner.core.errors import CallTimeout, PluginConfigError
from runner.plugin import EXCLUDED_RESPONSE_HEADERS, Plugin, Request, Response
from runner.protocol.messages import (
    METHOD_CODES,
    HTTPReqCall,
    HTTPRespCall,
    InfoKind,
    encode_req_call_reply,
    encode_resp_call_reply,
)
from runner.tools import refcodec

__all__ = [
    "CallTimeout",
    "FakeGateway",
    "PluginConfigError",
    "RequestResult",
    "ResponseResult",
    "RewriteAction",
    "StopAction",
    "load_plugin",
    "prepare",
    "run_request",
    "run_request_async",
    "run_response",
    "run_response_async",
]

P = TypeVar("P", bound=Plugin[Any])
T = TypeVar("T")

Plugins: TypeAlias = Plugin[Any] | Sequence[Plugin[Any]]
HeadersIn: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]
ArgsIn: TypeAlias = str | Mapping[str, str | None] | Iterable[tuple[str, str | None]]
VarsIn: TypeAlias = Mapping[str, str | bytes | None]
Asked: TypeAlias = tuple[Literal["var", "req_body", "resp_body"], str | None]

# The runner's default deadline, so a test sees the same limit as production.
DEFAULT_CALL_TIMEOUT = Config().call_timeout


def prepare(plugin: type[P], config: Any = None) -> P:
    """Create ``plugin`` for one route, its config checked exactly as at PrepareConf.

    ``config`` is the route's config: a dict (or any JSON value), JSON text as the
    gateway sends it, or None for no config. A config the plugin rejects raises
    :class:`PluginConfigError`, whose message names the plugin and the field::

        with pytest.raises(PluginConfigError, match="field 'keys'"):
            prepare(ApiKey, {"keys": []})
    """
    raw = config if isinstance(config, str) else "" if config is None else json.dumps(config)
    return plugin.from_json(raw)


# ------------------------------------------------------------------ what comes back


@dataclass(frozen=True, slots=True)
class StopAction:
    """The gateway answers the client itself with this response; no later plugin ran."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes  # b"" means "no body"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        key = name.lower()
        return next((v for n, v in self.headers if n.lower() == key), None)

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class RewriteAction:
    """The changes the gateway makes to the request before proxying it.

    Exactly the entries sent: a header or arg with value None is deleted, args are
    merged into the request's (a repeated name gives several values), ``path`` and
    ``body`` are None when unchanged. ``resp_headers`` go on the client's response.
    """

    path: str | None
    headers: list[tuple[str, str | None]]
    args: list[tuple[str, str | None]]
    resp_headers: list[tuple[str, str]]
    body: bytes | None


@dataclass(frozen=True, slots=True)
class RequestResult:
    """The outcome of the request phase, as the gateway receives it."""

    action: StopAction | RewriteAction | None
    """None: the request passes through unchanged."""
    asked: list[Asked]
    """What the plugins asked the gateway for, in order: ``("var", name)``,
    ``("req_body", None)``. Each is asked at most once per call."""
    request: Request = field(repr=False)
    """The request as a next plugin would see it (changes applied)."""

    @property
    def passed(self) -> bool:
        """True if the gateway gets no action: the request goes upstream unchanged."""
        return self.action is None

    @property
    def stop(self) -> StopAction:
        """The Stop the plugins answered with; fails the test if there is none."""
        if not isinstance(self.action, StopAction):
            raise AssertionError(f"expected the request to be stopped, but {self._what()}")
        return self.action

    @property
    def rewrite(self) -> RewriteAction:
        """The Rewrite the plugins made; fails the test if there is none."""
        if not isinstance(self.action, RewriteAction):
            raise AssertionError(f"expected the request to be rewritten, but {self._what()}")
        return self.action

    def _what(self) -> str:
        if self.action is None:
            return "it passed through unchanged"
        if isinstance(self.action, StopAction):
            return f"it was stopped with {self.action.status}: {self.action.body[:200]!r}"
        return f"it was rewritten: {self.action}"


@dataclass(frozen=True, slots=True)
class ResponseResult:
    """The outcome of the post-response phase: the reply the gateway receives, and what
    the gateway then sends the client."""

    status: int
    """The new status, or 0 for "unchanged"."""
    headers: list[tuple[str, str]]
    """Empty: the upstream's headers are kept. Otherwise they replace all of them."""
    body: bytes | None
    """The new body, or None for "unchanged"."""
    asked: list[Asked]
    upstream_status: int
    upstream_headers: list[tuple[str, str]]
    upstream_body: bytes | None = field(repr=False)

    @property
    def client_status(self) -> int:
        return self.status or self.upstream_status

    @property
    def client_headers(self) -> list[tuple[str, str]]:
        """The headers the client gets. With no header change the gateway drops the
        upstream's ``content-*``, ``location``, ``server`` and hop-by-hop headers."""
        if self.headers:
            return list(self.headers)
        return [(n, v) for n, v in self.upstream_headers if n.lower() not in _DROPPED]

    @property
    def client_body(self) -> bytes | None:
        return self.body if self.body else self.upstream_body

    @property
    def changed(self) -> bool:
        """False if the gateway gets a reply with no change at all."""
        return bool(self.status or self.headers or self.body)

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (any case) among :attr:`client_headers`."""
        key = name.lower()
        return next((v for n, v in self.client_headers if n.lower() == key), None)


_DROPPED = EXCLUDED_RESPONSE_HEADERS


# ------------------------------------------------------------------ the fake gateway


class FakeGateway:
    """Answers a call's ExtraInfo questions as the gateway would, and records them.

    ``vars`` maps nginx variable names to values (None or absent: no such variable).
    ``remote_addr`` defaults to the request's ``src_ip``, as in the gateway.
    """

    def __init__(
        self,
        vars: VarsIn | None = None,
        body: bytes | str | None = None,
        resp_body: bytes | str | None = None,
    ) -> None:
        self.vars = dict(vars or {})
        self.body = _bytes_or_none(body)
        self.resp_body = _bytes_or_none(resp_body)
        self.asked: list[Asked] = []

    async def ask(self, kind: InfoKind, name: str = "") -> bytes | None:
        if kind is InfoKind.VAR:
            self.asked.append(("var", name))
            value = self.vars.get(name)
            return value.encode() if isinstance(value, str) else value
        if kind is InfoKind.REQ_BODY:
            self.asked.append(("req_body", None))
            return self.body
        self.asked.append(("resp_body", None))
        return self.resp_body


# ------------------------------------------------------------------------ running


async def run_request_async(
    plugins: Plugins,
    *,
    method: str = "GET",
    path: str = "/",
    headers: HeadersIn = (),
    args: ArgsIn = (),
    src_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address = "127.0.0.1",
    vars: VarsIn | None = None,
    body: bytes | str | None = None,
    id: int = 0,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
) -> RequestResult:
    """Like :func:`run_request`, from a running event loop."""
    chain = _chain(plugins)
    ip = ipaddress.ip_address(src_ip) if isinstance(src_ip, str) else src_ip
    if method not in METHOD_CODES:
        raise ValueError(f"the gateway cannot send method {method!r} (one of {list(METHOD_CODES)})")
    payload = refcodec.encode_req_call(
        conf_token=1,
        id=id,
        method=method,
        path=path,
        args=_args(args),
        headers=_pairs(headers),
        src_ip=ip.packed,
    )
    all_vars: dict[str, str | bytes | None] = {"remote_addr": str(ip)}
    all_vars.update(vars or {})
    gateway = FakeGateway(all_vars, body)
    call = HTTPReqCall(payload)
    request = Request(call, gateway)
    if chain.request_inline:
        _plugin_errors(run_request_inline, chain, request)
    else:
        await _under_deadline(run_request_chain(chain, request, None), call_timeout)
    reply = refcodec.decode_req_call_reply(encode_req_call_reply(call.id, request.action()))
    return RequestResult(_action(reply.action), gateway.asked, request)


def run_request(
    plugins: Plugins,
    *,
    method: str = "GET",
    path: str = "/",
    headers: HeadersIn = (),
    args: ArgsIn = (),
    src_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address = "127.0.0.1",
    vars: VarsIn | None = None,
    body: bytes | str | None = None,
    id: int = 0,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
) -> RequestResult:
    """Run the request phase (``on_request``) of ``plugins`` over a fake request.

    ``plugins`` is one prepared plugin or a chain of them, in the route's order.
    ``headers`` is a dict or ``(name, value)`` pairs (repeat a name for several
    values); ``args`` is a query string (``"a=1&flag&empty="``: ``flag`` has no value,
    ``empty`` is ``""``), a dict or pairs. ``vars`` and ``body`` answer the plugins'
    ``await request.var(name)`` and ``await request.body()``.

    A plugin that raises makes this raise the same exception (the gateway would answer
    503); a chain that outlives ``call_timeout`` seconds (the runner's
    ``--call-timeout``) raises :class:`CallTimeout`.
    """
    return _run(
        run_request_async(
            plugins,
            method=method,
            path=path,
            headers=headers,
            args=args,
            src_ip=src_ip,
            vars=vars,
            body=body,
            id=id,
            call_timeout=call_timeout,
        )
    )


async def run_response_async(
    plugins: Plugins,
    *,
    status: int = 200,
    headers: HeadersIn = (),
    body: bytes | str | None = None,
    request_body: bytes | str | None = None,
    vars: VarsIn | None = None,
    id: int = 0,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
) -> ResponseResult:
    """Like :func:`run_response`, from a running event loop."""
    chain = _chain(plugins)
    upstream_headers = _pairs(headers)
    payload = refcodec.encode_resp_call(
        conf_token=1, id=id, status=status, headers=upstream_headers
    )
    gateway = FakeGateway(vars, request_body, body)
    call = HTTPRespCall(payload)
    response = Response(call.id, call.status, call.headers, gateway)
    if chain.response_inline:
        _plugin_errors(run_response_inline, chain, response)
    else:
        await _under_deadline(run_response_chain(chain, response, None), call_timeout)
    reply = refcodec.decode_resp_call_reply(encode_resp_call_reply(call.id, *response.reply()))
    return ResponseResult(
        status=reply.status,
        headers=[(n, v or "") for n, v in reply.headers],
        body=reply.body or None,
        asked=gateway.asked,
        upstream_status=status,
        upstream_headers=upstream_headers,
        upstream_body=gateway.resp_body,
    )


def run_response(
    plugins: Plugins,
    *,
    status: int = 200,
    headers: HeadersIn = (),
    body: bytes | str | None = None,
    request_body: bytes | str | None = None,
    vars: VarsIn | None = None,
    id: int = 0,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
) -> ResponseResult:
    """Run the post-response phase (``on_response``) of ``plugins`` over a fake upstream
    response: its ``status``, ``headers`` and ``body`` (what ``await response.body()``
    gets). ``request_body`` answers ``await response.request_body()``.

    Errors and the deadline behave as in :func:`run_request`.
    """
    return _run(
        run_response_async(
            plugins,
            status=status,
            headers=headers,
            body=body,
            request_body=request_body,
            vars=vars,
            id=id,
            call_timeout=call_timeout,
        )
    )


# ------------------------------------------------------------------------ helpers


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise RuntimeError(
            "an event loop is running: in an async test, await run_request_async(...)"
            " or run_response_async(...) instead"
        )
    # uvloop, as in production.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _chain(plugins: Plugins) -> Chain:
    chain = [plugins] if isinstance(plugins, Plugin | type) else list(plugins)
    for plugin in chain:
        if not isinstance(plugin, Plugin):
            raise TypeError(
                f"expected a prepared plugin, got {plugin!r}: use prepare(PluginClass, config)"
            )
    conf = tuple((p.name, "") for p in chain)
    return Chain.build("test", conf, chain)


def _plugin_errors(
    run: Callable[[Chain, Any], None], chain: Chain, call: Request | Response
) -> None:
    try:
        run(chain, call)
    except PluginFailed as exc:
        raise _unwrap(exc) from None


async def _under_deadline(coro: Coroutine[Any, Any, None], limit: float) -> None:
    try:
        async with asyncio.timeout(limit) as deadline:
            await coro
    except PluginFailed as exc:
        raise _unwrap(exc) from None
    except TimeoutError:
        if deadline.expired():
            raise CallTimeout(
                f"plugin chain did not finish within the {limit:g} s call deadline"
                " (the gateway would answer 503)"
            ) from None
        raise


def _unwrap(exc: PluginFailed) -> BaseException:
    cause = exc.__cause__ or exc
    cause.add_note(f"{exc}: the gateway would answer 503 for this request")
    return cause


def _action(
    action: refcodec.StopAction | refcodec.RewriteAction | None,
) -> StopAction | RewriteAction | None:
    if isinstance(action, refcodec.StopAction):
        return StopAction(action.status, [(n, v or "") for n, v in action.headers], action.body)
    if isinstance(action, refcodec.RewriteAction):
        return RewriteAction(
            path=action.path,
            headers=list(action.headers),
            args=list(action.args),
            resp_headers=[(n, v or "") for n, v in action.resp_headers],
            body=action.body,
        )
    return None


def _pairs(items: HeadersIn) -> list[tuple[str, str]]:
    return list(items.items() if isinstance(items, Mapping) else items)


def _args(args: ArgsIn) -> list[tuple[str, str | None]]:
    if isinstance(args, str):
        out: list[tuple[str, str | None]] = []
        for part in args.removeprefix("?").split("&"):
            if not part:
                continue
            name, eq, value = part.partition("=")
            out.append((unquote_plus(name), unquote_plus(value) if eq else None))
        return out
    return list(args.items() if isinstance(args, Mapping) else args)


def _bytes_or_none(data: bytes | str | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


def load_plugin(path: str | os.PathLike[str], name: str | None = None) -> type[Plugin[Any]]:
    """The plugin class defined in the file ``path``, imported exactly as the runner
    imports it: under a private package for its directory (so ``json.py`` or
    ``jwt.py`` shadow nothing, and ``from . import helpers`` finds the helper beside
    it), freshly on each call. ``name`` picks one plugin of a file that defines
    several. Import errors propagate, with the plugin's own traceback::

        Greet = load_plugin(Path(__file__).parent.parent / "greet.py")
    """
    from runner.core.registry import PluginImporter, plugins_in

    module = PluginImporter().import_file(Path(path))
    found = {cls.name: cls for cls in plugins_in(module)}
    if name is not None:
        if name not in found:
            raise LookupError(f"{path} defines no plugin named {name!r}; it has {sorted(found)}")
        return found[name]
    if len(found) != 1:
        raise LookupError(f"{path} defines {len(found)} plugins {sorted(found)}: give name=")
    return next(iter(found.values()))
