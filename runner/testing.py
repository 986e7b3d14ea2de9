"""Unit-test plugins without a gateway or a socket.

Prepare a plugin with its config (checked exactly as at PrepareConf), run it, or a
chain of plugins, over a fake request or upstream response, and assert on what the
gateway would receive::

    from runner.testing import prepare, run_request

    def test_a_request_without_a_key_gets_401() -> None:
        plugin = prepare(ApiKey, {"keys": ["s3cret"]})
        result = run_request(plugin, headers={"accept": "*/*"})
        assert result.stop.status == 401

The call goes through the runner's production path: the fake call is encoded as the
gateway encodes it and handed to the runner's own dispatcher, built as the server
builds it; the plugins run in the chain code the server uses (inline, awaited, or in
the runner's thread pool for ``blocking`` plugins, under the call deadline), and the
reply frame is decoded as the gateway decodes it. Only the gateway itself is fake: it
answers ``var()`` from ``vars`` and ``body()`` from ``body``, and records what it was
asked in ``result.asked``.

Results are the runner's message model: ``result.stop`` is a :class:`Stop`,
``result.rewrite`` a :class:`Rewrite` (frozen dataclasses; their sequences are tuples).

``run_request`` and ``run_response`` run their own event loop; from an ``async def``
test, ``await run_request_async(...)`` / ``run_response_async(...)`` instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import unquote_plus

import uvloop

from runner.core.calls import EXCLUDED_RESPONSE_HEADERS
from runner.core.chain import Chain, PluginFailed, create_plugin, route_namespace
from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.errors import CallTimeout, PluginConfigError
from runner.core.registry import PluginRegistry
from runner.plugin import InfoSource, Plugin, Request
from runner.protocol.connection import Exchange
from runner.protocol.frame import RPC
from runner.protocol.messages import (
    METHOD_CODES,
    InfoKind,
    Rewrite,
    Stop,
    decode_req_call_reply,
    decode_resp_call_reply,
    encode_req_call,
    encode_resp_call,
)
from runner.server.lifecycle import build_dispatcher
from runner.state import StateStore, open_state

__all__ = [
    "CallTimeout",
    "FakeGateway",
    "PluginConfigError",
    "RequestResult",
    "ResponseResult",
    "Rewrite",
    "Stop",
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


# The route a prepared plugin serves unless the test names one.
DEFAULT_ROUTE = "route#test"


def prepare(
    plugin: type[P],
    config: Any = None,
    *,
    store: StateStore | None = None,
    route: str = DEFAULT_ROUTE,
) -> P:
    """Create ``plugin`` for one route, its config checked exactly as at PrepareConf.

    ``config`` is the route's config: a dict (or any JSON value), JSON text exactly as
    the gateway sends it (``""`` is refused by a plugin that declares a config), or
    None for the plugin's defaults (``{}``; nothing for a plugin without config). A
    config the plugin rejects raises :class:`PluginConfigError`, whose message names
    the plugin and the field::

        with pytest.raises(PluginConfigError, match="field 'keys'"):
            prepare(ApiKey, {"keys": []})

    The plugin's ``state`` is in ``store``: by default a store of its own in memory,
    so two prepared plugins share nothing. Pass one store to several ``prepare`` calls
    to let them share it, as the workers of a runner do; ``open_state("memory://",
    clock=...)`` lets a test move time. ``route`` is the gateway's conf key of the
    route: plugins prepared with the same route and store share ``route_state``.
    """
    if isinstance(config, str):
        raw = config  # as the gateway sends it: "" is refused by a plugin with a config
    elif config is None:
        # No config given: a plugin that declares one gets its defaults ("{}").
        no_config = plugin.config_type is None or plugin.config_type is type(None)
        raw = "" if no_config else "{}"
    else:
        raw = json.dumps(config)
    if store is None:
        store = open_state("memory://")
    created = create_plugin(plugin, raw, store, route_namespace(route, ()))
    assert isinstance(created, plugin)
    return created


# ------------------------------------------------------------------ what comes back


@dataclass(frozen=True, slots=True)
class RequestResult:
    """The outcome of the request phase, as the gateway receives it."""

    action: Stop | Rewrite | None
    """None: the request passes through unchanged."""
    asked: list[Asked]
    """What the plugins asked the gateway for, in order: ``("var", name)``,
    ``("req_body", None)``. Each is asked at most once per call."""
    next_request: Request | None = field(repr=False)
    """The request as a next plugin would see it (changes applied); None if stopped."""

    @property
    def request(self) -> Request:
        """The request as a next plugin of the route would see it, changes applied;
        fails the test if the request was stopped (no next plugin runs)."""
        if self.next_request is None:
            raise AssertionError(f"no next plugin sees the request: {self._what()}")
        return self.next_request

    @property
    def passed(self) -> bool:
        """True if the gateway gets no action: the request goes upstream unchanged."""
        return self.action is None

    @property
    def stop(self) -> Stop:
        """The Stop the plugins answered with; fails the test if there is none."""
        if not isinstance(self.action, Stop):
            raise AssertionError(f"expected the request to be stopped, but {self._what()}")
        return self.action

    @property
    def rewrite(self) -> Rewrite:
        """The Rewrite the plugins made; fails the test if there is none."""
        if not isinstance(self.action, Rewrite):
            raise AssertionError(f"expected the request to be rewritten, but {self._what()}")
        return self.action

    def _what(self) -> str:
        if self.action is None:
            return "it passed through unchanged"
        if isinstance(self.action, Stop):
            return f"it was stopped with {self.action.status}: {self.action.body[:200]!r}"
        return f"it was rewritten: {self.action}"


@dataclass(frozen=True, slots=True)
class ResponseResult:
    """The outcome of the post-response phase: the reply the gateway receives, and what
    the gateway then sends the client."""

    status: int
    """The new status, or 0 for "unchanged"."""
    headers: tuple[tuple[str, str], ...]
    """Empty: the upstream's headers are kept. Otherwise they replace all of them."""
    body: bytes | None
    """The new body, or None for "unchanged"."""
    asked: list[Asked]
    upstream_status: int
    upstream_headers: tuple[tuple[str, str], ...]
    upstream_body: bytes | None = field(repr=False)

    @property
    def client_status(self) -> int:
        return self.status or self.upstream_status

    @property
    def client_headers(self) -> tuple[tuple[str, str], ...]:
        """The headers the client gets. With no header change the gateway drops the
        upstream's ``content-*``, ``location``, ``server`` and hop-by-hop headers."""
        if self.headers:
            return self.headers
        return tuple((n, v) for n, v in self.upstream_headers if n.lower() not in _DROPPED)

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
    chain, observer = _chain(plugins, with_observer=True)
    ip = ipaddress.ip_address(src_ip) if isinstance(src_ip, str) else src_ip
    if method not in METHOD_CODES:
        raise ValueError(f"the gateway cannot send method {method!r} (one of {list(METHOD_CODES)})")
    all_vars: dict[str, str | bytes | None] = {"remote_addr": str(ip)}
    all_vars.update(vars or {})
    gateway = FakeGateway(all_vars, body)
    with _Runner(call_timeout) as runner:
        token = runner.dispatcher.cache.put(chain)
        payload = encode_req_call(
            conf_token=token,
            id=id,
            method=method,
            path=path,
            args=_args(args),
            headers=_pairs(headers),
            src_ip=ip.packed,
        )
        reply = await runner.call(RPC.HTTP_REQ_CALL, payload, gateway)
    action = decode_req_call_reply(reply).action
    return RequestResult(action, gateway.asked, observer.seen if observer else None)


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
    chain, _ = _chain(plugins, with_observer=False)
    upstream_headers = tuple(_pairs(headers))
    gateway = FakeGateway(vars, request_body, body)
    with _Runner(call_timeout) as runner:
        token = runner.dispatcher.cache.put(chain)
        payload = encode_resp_call(conf_token=token, id=id, status=status, headers=upstream_headers)
        reply = decode_resp_call_reply(await runner.call(RPC.HTTP_RESP_CALL, payload, gateway))
    return ResponseResult(
        status=reply.status,
        headers=tuple((n, v or "") for n, v in reply.headers),
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


class _Observer(Plugin[None]):
    """Appended to the chain by run_request: sees the request as a next plugin would."""

    name = "runner.testing.observer"

    def __init__(self, config: None) -> None:
        super().__init__(config)
        self.seen: Request | None = None

    def on_request(self, request: Request) -> None:
        self.seen = request


def _chain(plugins: Plugins, *, with_observer: bool) -> tuple[Chain, _Observer | None]:
    chain = [plugins] if isinstance(plugins, Plugin | type) else list(plugins)
    for plugin in chain:
        if not isinstance(plugin, Plugin):
            raise TypeError(
                f"expected a prepared plugin, got {plugin!r}: use prepare(PluginClass, config)"
            )
    observer = _Observer(None) if with_observer else None
    steps = [*chain, observer] if observer is not None else chain
    conf = tuple((p.name, "") for p in steps)
    return Chain.build("runner.testing", conf, steps), observer


class _RecordingDispatcher(Dispatcher):
    """The production dispatcher, keeping the exception behind each error frame so that
    the test sees the plugin's own exception rather than a 503."""

    def __init__(self, base: Dispatcher) -> None:
        super().__init__(
            base.registry,
            base.cache,
            max_frame_size=base.max_frame_size,
            executor=base.executor,
        )
        self.failures: list[BaseException] = []

    def error_frame(self, exc: BaseException, call_id: int | None = None) -> bytes:
        self.failures.append(exc)
        return super().error_frame(exc, call_id)


class _Caller:
    """The dispatcher's ``Caller`` for one call: the fake gateway answers its questions,
    and its reply is kept (now, or from the coroutine of a call that waits)."""

    def __init__(self, gateway: InfoSource) -> None:
        self.ask = gateway.ask
        self.frame: bytes | None = None
        self.later: Coroutine[Any, Any, bytes] | None = None

    def reply(self, frame: bytes) -> None:
        self.frame = frame

    def reply_later(self, reply: Coroutine[Any, Any, bytes]) -> None:
        self.later = reply


class _Runner:
    """One call through a dispatcher built as the server builds it (its executor for
    blocking plugins included), under the server's deadline rule: the connection's
    ``Exchange`` ends a call that waits past ``call_timeout`` with its timeout error."""

    def __init__(self, call_timeout: float) -> None:
        config = Config(call_timeout=call_timeout)
        base = build_dispatcher(config, PluginRegistry())
        self.dispatcher = _RecordingDispatcher(base)
        self.exchange: Exchange[Any] = Exchange(
            self.dispatcher.error_frame,
            call_timeout=config.call_timeout,
            max_frame_size=config.max_frame_size,
        )

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        executor = self.dispatcher.executor
        if executor is not None:
            # A thread still blocked past the deadline is left to finish on its own.
            executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, rpc_type: RPC, payload: bytes, gateway: InfoSource) -> bytes:
        """The reply payload; a failed call raises what made it fail."""
        dispatcher = self.dispatcher
        caller = _Caller(gateway)
        dispatcher.handle(rpc_type, payload, caller)
        reply = caller.frame
        if caller.later is not None:
            # As the connection does: the call runs as a task; past its deadline the
            # exchange answers with the timeout error and the task is cancelled.
            loop = asyncio.get_running_loop()
            exchange = self.exchange
            call = exchange.call_waits(loop.time())
            task = loop.create_task(caller.later)
            due = exchange.call_due
            done, _ = await asyncio.wait({task}, timeout=max(0.0, (due or 0.0) - loop.time()))
            if done:
                reply = exchange.call_done(call, task.result())
            else:
                reply = exchange.expire(due if due is not None else loop.time())
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if reply is None:
            raise AssertionError("the runner gave no reply")
        if reply[0] == RPC.ERROR:
            raise _failure(dispatcher.failures[-1])
        if reply[0] != rpc_type:
            raise AssertionError(f"the runner replied with a frame of type {reply[0]}")
        return reply[4:]


def _failure(exc: BaseException) -> BaseException:
    if isinstance(exc, PluginFailed):
        cause = exc.__cause__ or exc
        cause.add_note(f"{exc}: the gateway would answer 503 for this request")
        return cause
    if isinstance(exc, CallTimeout):
        exc.add_note("the gateway would answer 503 for this request")
    return exc


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
