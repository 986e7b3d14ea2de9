"""A route's prepared plugin chain, and running it over one request or response.

Each phase has one loop, :func:`run_plain_steps`, which runs hooks for as long as they
can run right away (plain, non-blocking) and says where it had to stop. A chain of plain
hooks is therefore answered without a task; when a hook must be awaited (``async def``,
or ``blocking`` in a worker thread), :func:`finish_steps` awaits it and hands the rest
of the chain back to the same loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

from runner.core.calls import CallEdits
from runner.core.configschema import ConfigError, load_config
from runner.core.errors import BadRequest, PluginConfigError
from runner.plugin import Plugin, Request, Response
from runner.protocol.messages import MalformedMessage
from runner.state import StateStore

# Raised through a plugin by the ExtraInfo channel: the gateway's fault, not the plugin's.
_GATEWAY_FAULTS = (BadRequest, MalformedMessage)

REQUEST_HOOK = "on_request"
RESPONSE_HOOK = "on_response"


class PluginFailed(Exception):
    """A plugin's hook raised; the exception it raised is the cause."""

    def __init__(self, plugin: str, hook: str) -> None:
        super().__init__(f"plugin {plugin!r} raised in {hook}")
        self.plugin = plugin


# ----------------------------------------------------------------- plugin classes


def create_plugin(
    cls: type[Plugin[Any]], raw_config: str, state: StateStore, route: str
) -> Plugin[Any]:
    """Check a route's JSON config against ``cls``'s declaration and create the plugin
    instance for that route, its ``state`` in ``state`` and its ``route_state`` in the
    namespace ``route`` (see ``route_namespace``); a refused config raises
    :class:`PluginConfigError`."""
    try:
        config = load_config(cls.config_type, raw_config)
        # The state is bound before __init__ runs, so that __init__ may use it (to make
        # a namespace), while plugins keep their one-argument constructor.
        plugin = cls.__new__(cls)
        plugin._state_store = state
        plugin._route_namespace = route
        cls.__init__(plugin, config)
        return plugin
    except ConfigError as exc:
        raise PluginConfigError(cls.name, str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise PluginConfigError(cls.name, str(exc) or type(exc).__name__) from exc


def route_namespace(key: str, conf: Sequence[tuple[str, str]]) -> str:
    """The name of a route's state namespace (``Plugin.route_state``), the same on every
    worker and every runner that serves the route.

    From the gateway's conf key (route type, id and version, and the phase), which is
    the same on every gateway node reading one etcd; if the gateway sent none, from the
    conf itself, so routes with identical confs then share it. Hashed: a key may hold
    ``":"``, which a namespace may not, and has no bound on its length.
    """
    basis = key if key else json.dumps(list(conf))
    # surrogatepass: a key that was not UTF-8 on the wire arrives with surrogates.
    digest = hashlib.blake2b(basis.encode("utf-8", "surrogatepass"), digest_size=8)
    return "route-" + digest.hexdigest()


def implements(cls: type[Plugin[Any]], hook: str) -> bool:
    """True if ``cls`` overrides ``hook`` (a chain skips the hooks it does not)."""
    return getattr(cls, hook) is not getattr(Plugin, hook)


def summary(cls: type[Plugin[Any]]) -> str:
    """The first line of the plugin's docstring, or ``""``."""
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


class HookKind(IntEnum):
    PLAIN = 0  # called right on the loop
    ASYNC = 1  # awaited on the loop
    BLOCKING = 2  # a plain hook of a ``blocking`` plugin: run in the executor


def hook_kind(cls: type[Plugin[Any]], hook: str) -> HookKind:
    """How the runner calls ``hook``: decided once per chain, not per call."""
    if inspect.iscoroutinefunction(getattr(cls, hook)):
        return HookKind.ASYNC  # blocking or not: an async hook runs on the loop
    return HookKind.BLOCKING if cls.blocking else HookKind.PLAIN


# ------------------------------------------------------------------------ chains

Hook: TypeAlias = Callable[[Any], Any]
Step: TypeAlias = tuple[Plugin[Any], Hook, HookKind]
HookWrapper: TypeAlias = Callable[[Plugin[Any], str, Hook, HookKind], Hook]
"""Wraps a step's hook once, when its chain is built (metrics, tracing): given the
plugin, the hook's name, the bound hook and its kind, returns what the chain calls
instead, called the same way (an ASYNC hook's wrapper is ``async`` too)."""


@dataclass(frozen=True, slots=True)
class Chain:
    """The plugins of one PrepareConf, each created once with its checked config."""

    key: str
    conf: tuple[tuple[str, str], ...]
    # Each plugin with the hook, bound, and how it is called; only those that have one.
    request_steps: tuple[Step, ...]
    response_steps: tuple[Step, ...]

    @classmethod
    def build(
        cls,
        key: str,
        conf: Sequence[tuple[str, str]],
        plugins: Sequence[Plugin[Any]],
        wrap: HookWrapper | None = None,
    ) -> Chain:
        """``wrap``: applied to every step's hook (observing them costs nothing per
        call when there is none)."""
        return cls(
            key=key,
            conf=tuple(conf),
            request_steps=_steps(plugins, REQUEST_HOOK, wrap),
            response_steps=_steps(plugins, RESPONSE_HOOK, wrap),
        )


def _steps(plugins: Sequence[Plugin[Any]], hook: str, wrap: HookWrapper | None) -> tuple[Step, ...]:
    steps = []
    for p in plugins:
        if implements(type(p), hook):
            bound, kind = getattr(p, hook), hook_kind(type(p), hook)
            steps.append((p, bound if wrap is None else wrap(p, hook, bound, kind), kind))
    return tuple(steps)


def run_plain_steps(
    steps: tuple[Step, ...], call: Request | Response, edits: CallEdits, start: int = 0
) -> int:
    """Run ``steps[start:]`` while they are plain hooks, in order, until one stops the
    call. Returns the index of the first step that must be awaited (hand it to
    :func:`finish_steps`), or -1 once the chain is over."""
    i = start
    # Over the tuple itself, not range() and indexing: this runs once per call.
    for plugin, hook, kind in steps[start:] if start else steps:
        if kind:  # not PLAIN
            return i
        try:
            result = hook(call)
            if result is not None:
                raise _returned(_hook_name(call), result)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, _hook_name(call)) from exc
        if edits.stop is not None:
            return -1
        i += 1
    return -1


async def finish_steps(
    steps: tuple[Step, ...],
    call: Request | Response,
    edits: CallEdits,
    start: int,
    executor: Executor | None,
) -> None:
    """Run the rest of a chain from ``steps[start]``, the first step that must be
    awaited (as :func:`run_plain_steps` returned it)."""
    i = start
    while i >= 0:
        plugin, hook, kind = steps[i]
        try:
            if kind is HookKind.ASYNC:
                result = await hook(call)
            else:
                result = await _in_thread(hook, call, edits, executor)
            if result is not None:
                raise _returned(_hook_name(call), result)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, _hook_name(call)) from exc
        if edits.stop is not None:
            return
        i = run_plain_steps(steps, call, edits, i + 1)


async def _in_thread(
    hook: Hook, call: Request | Response, edits: CallEdits, executor: Executor | None
) -> Any:
    loop = asyncio.get_running_loop()
    edits.loop = loop  # lets the hook's run_sync reach the loop
    try:
        return await loop.run_in_executor(executor, hook, call)
    finally:
        # A thread that outlives its call (past the deadline) must not ask the
        # gateway on a connection that has moved on to another call.
        edits.loop = None


def _hook_name(call: Request | Response) -> str:
    # Worked out only when a hook fails: the loop itself need not know its phase.
    return REQUEST_HOOK if isinstance(call, Request) else RESPONSE_HOOK


def _returned(hook: str, result: object) -> TypeError:
    """The error for a hook that returned a value: hooks act on the call and return None.

    A value is never taken as a verdict (an auth hook returning False must not let the
    request through), and an awaitable from a plain function is not awaited: whether it
    would be awaited must not depend on the chain's other plugins.
    """
    if inspect.iscoroutine(result):
        result.close()  # never awaited, on purpose: spare the RuntimeWarning
        return TypeError(
            f"{hook} is a plain function but returned a coroutine: declare it 'async def'"
        )
    return TypeError(
        f"{hook} returned {type(result).__name__} {result!r:.40}; hooks must return None "
        "and act through the call (stop, set_path, headers...)"
    )


__all__ = [
    "Chain",
    "HookKind",
    "HookWrapper",
    "PluginFailed",
    "create_plugin",
    "finish_steps",
    "hook_kind",
    "implements",
    "route_namespace",
    "run_plain_steps",
    "summary",
]
