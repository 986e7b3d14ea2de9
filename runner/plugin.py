"""The plugin-author API: everything a plugin imports from the runner is here.

A plugin is a subclass of :class:`Plugin` with a ``name``. The runner creates one
instance per route configuration when the gateway prepares that route (PrepareConf),
after checking the route's JSON config against the plugin's declared config type; the
instance then serves every request of that route until the gateway drops the conf.

Per request, the runner calls ``on_request`` of each plugin of the route in the route's
order, all on the same :class:`Request`. Each plugin sees the changes made by the
plugins before it. A plugin that calls :meth:`Request.stop` ends the chain: later
plugins do not run, and the gateway answers the client with that response (any
rewrite made so far is dropped). Otherwise the accumulated changes go back to the
gateway as one rewrite, and only what changed is sent.

In the post-response phase (``ext-plugin-post-resp``), ``on_response`` runs the same way
on a :class:`Response` describing the upstream's answer.

Both hooks may be plain functions or ``async def``. A plain hook runs on the event loop
and must not block; set ``blocking = True`` on the class to run plain hooks in a worker
thread instead. Only ``async`` hooks can ``await`` the gateway for a variable or a body.

Nothing here speaks the wire protocol: the views record each change in the runner's
edits record for the call (``runner.core.calls``), which the runner encodes.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from typing import (
    Any,
    ClassVar,
    Final,
    Generic,
    Protocol,
    TypeAlias,
    TypeVar,
    get_args,
    get_origin,
    overload,
)

from runner.core.calls import (
    EXCLUDED_RESPONSE_HEADERS,
    CallEdits,
    ChangeLog,
    RequestEdits,
    ResponseEdits,
)
from runner.core.configschema import ConfigError
from runner.core.logs import PluginLogger, plugin_logger
from runner.protocol.messages import Entry, InfoKind, Stop
from runner.state import State, StateStore, StateUnavailable, Take

__all__ = [
    "Args",
    "ConfigError",
    "Headers",
    "InfoSource",
    "Plugin",
    "Request",
    "Response",
    "ResponseHeaders",
    # The shared state's types, so that a plugin imports everything from here.
    "State",
    "StateUnavailable",
    "Take",
]

ConfigT = TypeVar("ConfigT")
EditsT = TypeVar("EditsT", bound=CallEdits)


class InfoSource(Protocol):
    """Where a call's extra information comes from: the gateway, or a test's fake."""

    def ask(self, kind: InfoKind, name: str = "") -> Awaitable[bytes | None]: ...


class RawRequest(Protocol):
    """The fields of an HTTPReqCall the Request reads (decoded lazily by the runner)."""

    id: int

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def src_ip(self) -> bytes: ...
    @property
    def args(self) -> list[Entry]: ...
    @property
    def headers(self) -> list[Entry]: ...


def _check_text(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"{what} must not contain CR, LF or NUL: {value!r}")
    return value


def _discard(awaitable: Awaitable[Any]) -> None:
    """Close a coroutine that will never run, sparing the "never awaited" warning."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def _as_bytes(data: bytes | str) -> bytes:
    # surrogateescape: text built from a non-UTF-8 header value goes back as its bytes.
    return data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)


# Request.stop's answers by value: (status, body, header pairs) -> the checked Stop,
# which encodes itself once. Bounded: emptied when full (a plugin whose answers all
# differ gains nothing from it and loses little), and large bodies are not kept.
_StopKey: TypeAlias = tuple[int, bytes | str, tuple[tuple[str, str], ...]]
_STOPS: dict[_StopKey, Stop] = {}
_STOP_MEMO_SIZE: Final = 256
_STOP_MEMO_BODY: Final = 4096


def _checked_stop(
    status: int,
    body: bytes | str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
) -> Stop:
    if type(status) is not int or not 100 <= status <= 999:
        raise ValueError(f"status must be an HTTP status code (100-999), got {status!r}")
    if not headers:
        checked: tuple[tuple[str, str], ...] = ()
    else:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        out = []
        for name, value in pairs:
            # _check_text, inlined for the usual clean pair; it says what is wrong.
            if (
                type(name) is not str
                or type(value) is not str
                or "\r" in (both := name + value)
                or "\n" in both
                or "\0" in both
            ):
                _check_text("header name", name)
                _check_text("header value", value)
            out.append((name, value))
        checked = tuple(out)
    return Stop(status, checked, _as_bytes(body))


class _MultiDict:
    """Ordered multi-valued entries with change tracking; the base of headers and args."""

    __slots__ = ("_entries", "_log", "_pending", "_source")
    _fold: ClassVar[bool]  # names are case-insensitive (compared lower-cased)

    def __init__(self, source: Iterable[Entry] | None = None, log: ChangeLog | None = None) -> None:
        self._source = source  # shared with the decoded message until the first change
        self._entries: list[Entry] | None = None
        # Each changed name and its values now, in the call's edits record: what the
        # runner sends the gateway, without reading the entries again.
        self._log: ChangeLog = {} if log is None else log
        # Replacements made before anything was read: key -> (name, values). Setting a
        # header should not cost decoding all of them; the source is decoded and the
        # replacements applied (in order) only when a plugin reads the entries.
        self._pending: dict[str, tuple[str, list[str | None]]] | None = None

    def _key(self, name: str) -> str:
        return name.lower() if self._fold else name

    def _items(self) -> Iterable[Entry]:
        if self._entries is not None:
            return self._entries
        if self._pending is not None:
            return self._apply_pending(self._pending)
        return self._source if self._source is not None else ()

    def _apply_pending(self, pending: dict[str, tuple[str, list[str | None]]]) -> list[Entry]:
        # The same result as applying each _replace to the decoded source in turn: the
        # untouched entries in order, then each replaced name's values, latest last.
        source = self._source if self._source is not None else ()
        entries = [e for e in source if self._key(e[0]) not in pending]
        for name, values in pending.values():
            entries.extend((name, v) for v in values)
        self._entries = entries
        self._pending = None
        return entries

    def _mutable(self) -> list[Entry]:
        if self._entries is None:
            self._entries = list(self._items())
        return self._entries

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default`` if there is none."""
        key = self._key(name)
        for n, v in self._items():
            if self._key(n) == key:
                return v
        return default

    def getall(self, name: str) -> list[str | None]:
        """Every value of ``name``, in order (empty if absent)."""
        key = self._key(name)
        return [v for n, v in self._items() if self._key(n) == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._key(name)
        return any(self._key(n) == key for n, _ in self._items())

    def __getitem__(self, name: str) -> str | None:
        key = self._key(name)
        for n, v in self._items():
            if self._key(n) == key:
                return v
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        """Each distinct name once (as first spelled), in order of first appearance."""
        first: dict[str, str] = {}
        for n, _ in self._items():
            first.setdefault(self._key(n), n)
        return iter(first.values())

    def __len__(self) -> int:
        return len({self._key(n) for n, _ in self._items()})

    def items(self) -> list[Entry]:
        """All ``(name, value)`` entries, repeated names included, in order."""
        return list(self._items())

    def _replace(self, name: str, values: list[str | None]) -> None:
        """Give ``name`` these values (the list is kept: pass a fresh one)."""
        key = name.lower() if self._fold else name  # _key, inlined: once per change
        change = (name, values)  # immutable, so the pending change and the log share it
        if self._entries is None:
            pending = self._pending
            if pending is None:
                self._pending = {key: change}
            else:
                pending.pop(key, None)  # a replaced name moves to the end, as below
                pending[key] = change
        else:
            entries = [e for e in self._entries if self._key(e[0]) != key]
            entries.extend((name, v) for v in values)
            self._entries = entries
        self._log[key] = change

    def _append(self, name: str, value: str | None) -> None:
        entries = self._mutable()
        key = self._key(name)
        logged = self._log.get(key)
        before = logged[1] if logged is not None else self.getall(name)
        entries.append((name, value))
        self._log[key] = (name, [*before, value])

    @property
    def changed(self) -> bool:
        """True once a plugin changed any entry (even back to what it was)."""
        return bool(self._log)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.items()!r})"


class Headers(_MultiDict):
    """Request headers: case-insensitive names, one entry per value.

    ``set`` and ``delete`` are sent to the gateway; it replaces the header with a single
    value (a request header cannot be given several values through the protocol). The
    ``host`` header also changes the upstream host.
    """

    __slots__ = ()
    _fold = True

    def get(self, name: str, default: str | None = None) -> str | None:
        return super().get(name, default)

    def set(self, name: str, value: str) -> None:
        """Give header ``name`` exactly this value."""
        self._replace(_check_text("header name", name), [_check_text("header value", value)])

    def delete(self, name: str) -> None:
        """Remove every value of header ``name`` (nothing is sent if it was absent)."""
        if name in self:
            self._replace(name, [])


class ResponseHeaders(Headers):
    """Headers of a response: like :class:`Headers`, and a name may have several values.

    Both ``response.headers`` (post-response phase) and ``request.response_headers``
    (headers to add to the response the client will get) are of this type. The latter
    refuses ``connection``, ``content-length``, ``transfer-encoding``, ``location``,
    ``server``, ``www-authenticate`` and ``content-*`` with ValueError: the gateway
    silently ignores them there.
    """

    __slots__ = ("_refused",)

    def __init__(
        self,
        source: Iterable[Entry] | None = None,
        log: ChangeLog | None = None,
        refused: frozenset[str] = frozenset(),
    ) -> None:
        # _MultiDict.__init__, inlined: a request that sets a response header makes one.
        self._source = source
        self._entries = None
        self._log = {} if log is None else log
        self._pending = None
        self._refused = refused

    def set(self, name: str, value: str) -> None:
        """Give header ``name`` exactly this value, replacing all it had."""
        _check_text("header name", name)  # _check_name, inlined: the usual change
        if self._refused and name.lower() in self._refused:
            raise ValueError(f"the gateway ignores response header {name!r} in a rewrite")
        self._replace(name, [_check_text("header value", value)])

    def add(self, name: str, value: str) -> None:
        """Add one more value for ``name``, keeping the ones it has."""
        self._append(self._check_name(name), _check_text("header value", value))

    def _check_name(self, name: str) -> str:
        _check_text("header name", name)
        if self._refused and name.lower() in self._refused:
            raise ValueError(f"the gateway ignores response header {name!r} in a rewrite")
        return name


class Args(_MultiDict):
    """Query arguments: case-sensitive names, repeated names kept apart.

    A value of None is an argument without ``=`` (``?flag``); ``""`` is ``?flag=``.
    """

    __slots__ = ()
    _fold = False

    def set(self, name: str, value: str) -> None:
        """Give argument ``name`` exactly this one value."""
        self._replace(_check_text("arg name", name), [_check_text("arg value", value)])

    def setall(self, name: str, values: Iterable[str]) -> None:
        """Give argument ``name`` these values, in order (none deletes it)."""
        checked: list[str | None] = [_check_text("arg value", v) for v in values]
        self._replace(_check_text("arg name", name), checked)

    def add(self, name: str, value: str) -> None:
        """Add one more value for ``name``, keeping the ones it has."""
        self._append(_check_text("arg name", name), _check_text("arg value", value))

    def delete(self, name: str) -> None:
        """Remove every value of ``name`` (nothing is sent if it was absent)."""
        if name in self:
            self._replace(name, [])


class _Call(Generic[EditsT]):
    """What a request and a response share: the call id and the gateway's variables."""

    __slots__ = ("_answers", "_edits", "_source")

    def __init__(self, source: InfoSource, edits: EditsT) -> None:
        self._source = source
        self._edits = edits
        # The gateway's answers, asked once per call: variables by name (a str), bodies
        # by kind (an InfoKind, an int: never equal to a name). One dict per call.
        self._answers: dict[str | InfoKind, bytes | None] = {}

    async def var_bytes(self, name: str) -> bytes | None:
        """Like :meth:`var`, without decoding."""
        # A membership test, not try/except KeyError: the first ask of every call would
        # raise, and the gateway would be awaited with that exception as context.
        known = self._answers
        if name in known:
            return known[name]
        value = known[name] = await self._source.ask(InfoKind.VAR, name)
        return value

    async def var(self, name: str) -> str | None:
        """An nginx variable of this request, asked of the gateway once per call.

        Returns None if the variable does not exist (or has no value) and ``""`` if
        it exists and is empty. Examples: ``remote_addr``, ``server_port``,
        ``request_time``, ``http_user_agent``, ``arg_name``, ``cookie_name``.
        """
        known = self._answers  # var_bytes, inlined: one coroutine less per variable
        if name in known:
            raw = known[name]
        else:
            raw = known[name] = await self._source.ask(InfoKind.VAR, name)
        return None if raw is None else raw.decode("utf-8", "surrogateescape")

    async def _fetch_body(self, kind: InfoKind) -> bytes | None:
        known = self._answers
        if kind in known:
            return known[kind]
        value = known[kind] = await self._source.ask(kind)
        return value

    def run_sync(self, awaitable: Awaitable[Any], timeout: float | None = None) -> Any:
        """From a ``blocking = True`` plugin's worker thread: wait for an awaitable
        of this call, e.g. ``request.run_sync(request.var("remote_addr"))``.

        Raises RuntimeError outside a blocking hook, and once the call is over (a
        thread still running past the call deadline can no longer ask the gateway).
        """
        edits = self._edits
        loop = edits.loop
        if loop is None:
            _discard(awaitable)
            raise RuntimeError(
                "run_sync works only in a blocking plugin's hook, while its call lasts"
            )

        async def wrapper() -> Any:
            if edits.loop is None:  # the call ended while this was on its way
                _discard(awaitable)
                raise RuntimeError("the call is over: the gateway can no longer be asked")
            return await awaitable

        coro = wrapper()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed: the runner is shutting down
            coro.close()
            _discard(awaitable)
            raise
        return future.result(timeout)


class Request(_Call[RequestEdits]):
    """One request, as the gateway describes it, and the changes plugins make to it.

    Reading: ``id``, ``method``, ``path``, ``src_ip``, ``headers``, ``args`` and, by asking
    the gateway, ``await var(name)`` and ``await body()``. Changing: :meth:`stop`, or
    any of :meth:`set_path`, ``headers.set/delete``, ``args.set/add/delete``,
    :meth:`set_body`, ``response_headers.set/add``; these read back at once.

    The runner creates it; plugins receive it.
    """

    __slots__ = ("_args", "_headers", "_raw", "_resp_headers", "_src_ip", "id")

    def __init__(self, raw: RawRequest, source: InfoSource, edits: RequestEdits) -> None:
        # _Call.__init__, inlined: one call less per request.
        self._source = source
        self._edits = edits
        self._answers = {}
        self._raw = raw
        self.id: int = raw.id
        self._src_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | bool | None = False
        # Made on first use: most plugins of a route never touch them.
        self._headers: Headers | None = None
        self._args: Args | None = None
        self._resp_headers: ResponseHeaders | None = None

    @property
    def headers(self) -> Headers:
        """The request headers; ``set``/``delete`` send changes to the gateway."""
        headers = self._headers
        if headers is None:
            log: ChangeLog = {}
            self._edits.headers = log
            headers = self._headers = Headers(_LazyEntries(self._raw, "headers"), log)
        return headers

    @property
    def args(self) -> Args:
        """The query args; ``set``/``add``/``delete`` send changes to the gateway."""
        args = self._args
        if args is None:
            log: ChangeLog = {}
            self._edits.args = log
            args = self._args = Args(_LazyEntries(self._raw, "args"), log)
        return args

    @property
    def response_headers(self) -> ResponseHeaders:
        """Headers to set on the response the client eventually gets (replacing the
        upstream's values of those names): ``set`` replaces, ``add`` keeps the values
        set before. Starts empty: the upstream's response is not known yet.
        ``connection``, ``content-length``, ``transfer-encoding``, ``location``,
        ``server``, ``www-authenticate`` and ``content-*`` raise ValueError (the gateway
        ignores them here)."""
        table = self._resp_headers
        if table is None:
            log: ChangeLog = {}
            self._edits.resp_headers = log
            table = self._resp_headers = ResponseHeaders(None, log, EXCLUDED_RESPONSE_HEADERS)
        return table

    @property
    def method(self) -> str:
        """The HTTP method, upper case (``GET``, ``POST``...)."""
        return self._raw.method

    @property
    def path(self) -> str:
        """The path without the query; reflects :meth:`set_path` by an earlier plugin."""
        path = self._edits.path
        return path if path is not None else self._raw.path

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The client's address, or None if the gateway did not send one."""
        if self._src_ip is False:
            raw = self._raw.src_ip
            self._src_ip = ipaddress.ip_address(raw) if len(raw) in (4, 16) else None
        return self._src_ip  # type: ignore[return-value]

    async def body(self) -> bytes | None:
        """The request body, asked of the gateway once per call (None if there is none)."""
        return await self._fetch_body(InfoKind.REQ_BODY)

    def stop(
        self,
        status: int = 200,
        body: bytes | str = b"",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    ) -> None:
        """Answer the client now, with this response; no later plugin runs.

        The request never reaches the upstream and rewrites made so far are dropped.
        Repeated header names all reach the client. An empty body means "no body".
        """
        # A plugin that answers here mostly sends the same few responses: each is
        # checked and encoded once, then found again by its value.
        key: _StopKey | None
        if type(status) is not int:
            key = None
        elif type(headers) is dict:
            key = (status, body, tuple(headers.items()))
        elif type(headers) is tuple:
            key = (status, body, headers)
        elif not headers:
            key = (status, body, ())
        else:
            key = None
        try:
            stop = _STOPS.get(key)  # type: ignore[arg-type]  # None: never found
        except TypeError:  # a value that cannot be hashed: the checks below say what
            key = stop = None
        if stop is None:
            stop = _checked_stop(status, body, headers)
            if key is not None and len(body) <= _STOP_MEMO_BODY:
                if len(_STOPS) >= _STOP_MEMO_SIZE:
                    _STOPS.clear()
                _STOPS[key] = stop
        self._edits.stop = stop

    @property
    def stopped(self) -> bool:
        """True once a plugin has called :meth:`stop`."""
        return self._edits.stop is not None

    def set_path(self, path: str) -> None:
        """Send the request upstream to this path (percent-encoded by the gateway).

        The query is not part of the path: change it through ``args``.
        """
        _check_text("path", path)
        if "?" in path:
            raise ValueError("path must not contain '?': the gateway would encode it; use args")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        self._edits.path = path

    def set_body(self, body: bytes | str) -> None:
        """Replace the request body sent upstream. It must not be empty: the gateway
        reads an empty body as "unchanged"."""
        data = _as_bytes(body)
        if not data:
            raise ValueError("the gateway cannot set an empty request body")
        self._answers[InfoKind.REQ_BODY] = data
        self._edits.body = data


class _LazyEntries:
    """Defers decoding headers/args until a plugin first looks at them."""

    __slots__ = ("_attr", "_raw")

    def __init__(self, raw: RawRequest, attr: str) -> None:
        self._raw = raw
        self._attr = attr

    def __iter__(self) -> Iterator[Entry]:
        entries: list[Entry] = getattr(self._raw, self._attr)
        return iter(entries)

    def __len__(self) -> int:
        return len(getattr(self._raw, self._attr))


class Response(_Call[ResponseEdits]):
    """The upstream's response in the post-response phase, and the changes to make.

    Reading: ``id``, ``status``, ``headers``, and by asking the gateway ``await body()``,
    ``await request_body()``, ``await var(name)``. Changing: :meth:`set_status`,
    ``headers.set/add/delete``, :meth:`set_body`.

    What the gateway does with the changes: a new status replaces the upstream's; a
    new body replaces the upstream's (an empty body cannot be sent: it reads as
    "unchanged"). If any header changes, the runner sends the whole resulting header
    list, because the gateway replaces every upstream header with a non-empty list;
    so deleting every header cannot be expressed (an empty list keeps the upstream's).
    With no header change, the gateway copies the upstream's headers except
    ``content-*``, ``location``, ``server``, ``www-authenticate`` and hop-by-hop ones.
    """

    __slots__ = ("_status", "headers", "id")

    def __init__(
        self,
        call_id: int,
        status: int,
        headers: list[Entry],
        source: InfoSource,
        edits: ResponseEdits,
    ) -> None:
        super().__init__(source, edits)
        self.id = call_id
        self._status = status
        log: ChangeLog = {}
        self.headers = edits.headers = ResponseHeaders(headers, log)
        edits.header_log = log

    @property
    def status(self) -> int:
        """The status the client will get (the upstream's unless changed)."""
        return self._edits.status or self._status

    @property
    def upstream_status(self) -> int:
        """The status the upstream answered with, whatever :meth:`set_status` did."""
        return self._status

    async def body(self) -> bytes | None:
        """The upstream's response body, asked of the gateway once per call."""
        new_body = self._edits.body
        if new_body is not None:
            return new_body
        return await self._fetch_body(InfoKind.RESP_BODY)

    async def request_body(self) -> bytes | None:
        """The original request's body."""
        return await self._fetch_body(InfoKind.REQ_BODY)

    def set_status(self, status: int) -> None:
        """Give the client this status instead of the upstream's."""
        if not 100 <= status <= 999:
            raise ValueError(f"status must be an HTTP status code (100-999), got {status}")
        self._edits.status = status

    def set_body(self, body: bytes | str) -> None:
        """Replace the response body. It must not be empty: the gateway reads an empty
        body as "unchanged"."""
        data = _as_bytes(body)
        if not data:
            raise ValueError("the gateway cannot send an empty replacement body")
        self._edits.body = data


class _PluginLog:
    """``Plugin.log``: made on first use and then kept in the instance (a non-data
    descriptor, so the instance's own attribute wins: later reads cost nothing, and the
    runner sets it with the route when it creates the plugin for one)."""

    @overload
    def __get__(self, plugin: None, owner: type[Any]) -> _PluginLog: ...
    @overload
    def __get__(self, plugin: Plugin[Any], owner: type[Any]) -> PluginLogger: ...
    def __get__(self, plugin: Plugin[Any] | None, owner: type[Any]) -> PluginLogger | _PluginLog:
        if plugin is None:
            return self  # on the class: the descriptor, as a property would be
        logger = plugin_logger(type(plugin).name)
        plugin.__dict__["log"] = logger
        return logger


class Plugin(Generic[ConfigT]):
    """Base class of every plugin. Subclass it, set ``name``, override a hook.

    ``class MyPlugin(Plugin[MyConfig])`` declares the config type: a dataclass (checked
    field by field at PrepareConf, unknown fields rejected), ``dict[str, Any]``, ``Any``
    or ``None`` (no config). A config the plugin rejects makes the gateway's PrepareConf
    fail with a message naming the field; the route then answers 503 rather than run
    without the plugin. ``self.config`` holds the result.

    Class attributes:
      ``name``: how routes refer to the plugin (unique among loaded plugins).
      ``blocking``: run plain (non-async) hooks in a worker thread, for code that
      blocks (a synchronous HTTP client, a database driver, heavy CPU).

    ``self.log`` is the plugin's logger (a ``logging.LoggerAdapter``): its lines carry
    the plugin's name and the route it serves (the conf's key), come out at the
    runner's ``--log-level`` and in its ``--log-format``, and repeated lines are held
    back like the runner's own. Log events, not requests: the gateway copies every line
    into its error.log.

    An instance lives in one worker process: what it keeps in its own attributes is per
    worker. State shared by every worker (and, on Redis, every runner) goes through
    ``self.state`` and ``self.route_state``, there from ``__init__`` on.
    """

    name: ClassVar[str]
    config_type: ClassVar[Any] = None
    blocking: ClassVar[bool] = False
    log: ClassVar[_PluginLog] = _PluginLog()

    # Bound by the runner (runner.core.chain.create_plugin, or runner.testing.prepare)
    # before __init__ runs, so that __init__ may already use the state.
    _state_store: StateStore | None = None
    _route_namespace: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_type" not in cls.__dict__:
            for base in getattr(cls, "__orig_bases__", ()):
                if get_origin(base) is Plugin:
                    (cls.config_type,) = get_args(base)

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @property
    def state(self) -> State:
        """The plugin's shared state (``runner.state.State``): keys in the plugin's own
        namespace (its ``name``), shared by every route that uses the plugin, by every
        worker and, with a Redis ``--state-url``, by every runner on that Redis.

        Each call is one atomic step (``incr`` never loses a count, ``take`` never lets
        more than the bucket through); a call that cannot reach the state raises
        ``runner.state.StateUnavailable`` within a bounded time.
        """
        store = self._state_store
        if store is None:
            raise RuntimeError(
                f"{type(self).__name__} has no state: it was made without the runner; "
                "in tests, make it with runner.testing.prepare()"
            )
        return store.for_plugin(self.name)

    @property
    def route_state(self) -> State:
        """``state`` for this plugin's route alone: the same namespace on every worker
        and runner that serves the route (named after the gateway's conf key: route id,
        version and phase, so a route edited in the gateway starts afresh)."""
        return self.state.namespace(self._route_namespace)

    def on_request(self, request: Request) -> Awaitable[None] | None:
        """Called for each request of a route that lists this plugin (pre-req phase)."""
        return None

    def on_response(self, response: Response) -> Awaitable[None] | None:
        """Called in the post-response phase, with the upstream's response."""
        return None
