"""A route's prepared plugin chain, and running it over one request or response."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from runner.core.errors import BadRequest
from runner.plugin import Plugin, Request, Response
from runner.protocol.messages import MalformedMessage

# Raised through a plugin by the ExtraInfo channel: the gateway's fault, not the plugin's.
_GATEWAY_FAULTS = (BadRequest, MalformedMessage)


class PluginFailed(Exception):
    """A plugin's hook raised; the exception it raised is the cause."""

    def __init__(self, plugin: str, hook: str) -> None:
        super().__init__(f"plugin {plugin!r} raised in {hook}")
        self.plugin = plugin


def _returned(plugin: Plugin[Any], hook: str, result: object) -> TypeError:
    """The error for a hook that returned a value: hooks act on the call and return None.

    A value is never taken as a verdict (an auth hook returning False must not let the
    request through), and an awaitable from a plain function is not awaited: whether a
    chain runs inline depends on its other plugins, so awaiting it only sometimes would
    make the same plugin work on one route and be skipped on another.
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


@dataclass(frozen=True, slots=True)
class Chain:
    """The plugins of one PrepareConf, each created once with its checked config."""

    key: str
    conf: tuple[tuple[str, str], ...]
    request_plugins: tuple[Plugin[Any], ...]
    response_plugins: tuple[Plugin[Any], ...]
    # True when every hook is plain and non-blocking: the call is served without a task.
    request_inline: bool
    response_inline: bool
    # Each request plugin, and whether its on_request is ``async def`` (awaited right
    # on the loop): decided once here, not per call.
    request_steps: tuple[tuple[Plugin[Any], bool], ...]

    @classmethod
    def build(
        cls, key: str, conf: Sequence[tuple[str, str]], plugins: Sequence[Plugin[Any]]
    ) -> Chain:
        req = tuple(p for p in plugins if p.handles_requests())
        resp = tuple(p for p in plugins if p.handles_responses())
        return cls(
            key=key,
            conf=tuple(conf),
            request_plugins=req,
            response_plugins=resp,
            request_inline=all(p.runs_inline("on_request") for p in req),
            response_inline=all(p.runs_inline("on_response") for p in resp),
            request_steps=tuple((p, inspect.iscoroutinefunction(p.on_request)) for p in req),
        )


def run_request_inline(chain: Chain, request: Request) -> None:
    for plugin in chain.request_plugins:
        try:
            result = plugin.on_request(request)
            if result is not None:
                raise _returned(plugin, "on_request", result)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_request") from exc
        if request.stopped:
            return


def run_response_inline(chain: Chain, response: Response) -> None:
    for plugin in chain.response_plugins:
        try:
            result = plugin.on_response(response)
            if result is not None:
                raise _returned(plugin, "on_response", result)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_response") from exc


async def run_request(chain: Chain, request: Request, executor: Executor | None) -> None:
    for plugin, is_async in chain.request_steps:
        try:
            if is_async:  # the usual async plugin, awaited without _run_hook's dispatch
                result = await plugin.on_request(request)  # type: ignore[misc]
                if result is not None:
                    raise _returned(plugin, "on_request", result)
            else:
                await _run_hook(plugin, "on_request", request, executor)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_request") from exc
        if request.stopped:
            return


async def run_response(chain: Chain, response: Response, executor: Executor | None) -> None:
    for plugin in chain.response_plugins:
        try:
            await _run_hook(plugin, "on_response", response, executor)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_response") from exc


async def _run_hook(
    plugin: Plugin[Any], hook_name: str, call: Request | Response, executor: Executor | None
) -> None:
    hook = getattr(plugin, hook_name)
    if inspect.iscoroutinefunction(hook):
        result = await hook(call)  # blocking or not: an async hook runs on the loop
    elif plugin.blocking:
        loop = asyncio.get_running_loop()
        call._loop = loop
        try:
            result = await loop.run_in_executor(executor, hook, call)
        finally:
            # A thread that outlives its call (past the deadline) must not ask the
            # gateway on a connection that has moved on to another call.
            call._loop = None
    else:
        result = hook(call)
    if result is not None:
        raise _returned(plugin, hook_name, result)
