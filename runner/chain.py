"""A route's prepared plugin chain, and running it over one request or response."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from runner.errors import BadRequest
from runner.messages import MalformedMessage
from runner.plugin import Plugin, Request, Response

# Raised through a plugin by the ExtraInfo channel: the gateway's fault, not the plugin's.
_GATEWAY_FAULTS = (BadRequest, MalformedMessage)


class PluginFailed(Exception):
    """A plugin's hook raised; the exception it raised is the cause."""

    def __init__(self, plugin: str, hook: str) -> None:
        super().__init__(f"plugin {plugin!r} raised in {hook}")
        self.plugin = plugin


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
        )


def run_request_inline(chain: Chain, request: Request) -> None:
    for plugin in chain.request_plugins:
        try:
            plugin.on_request(request)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_request") from exc
        if request.stopped:
            return


def run_response_inline(chain: Chain, response: Response) -> None:
    for plugin in chain.response_plugins:
        try:
            plugin.on_response(response)
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_response") from exc


async def run_request(chain: Chain, request: Request, executor: Executor | None) -> None:
    for plugin in chain.request_plugins:
        try:
            if plugin.blocking:
                await _in_thread(plugin.on_request, request, executor)
            else:
                result = plugin.on_request(request)
                if result is not None:
                    await result
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_request") from exc
        if request.stopped:
            return


async def run_response(chain: Chain, response: Response, executor: Executor | None) -> None:
    for plugin in chain.response_plugins:
        try:
            if plugin.blocking:
                await _in_thread(plugin.on_response, response, executor)
            else:
                result = plugin.on_response(response)
                if result is not None:
                    await result
        except _GATEWAY_FAULTS:
            raise
        except Exception as exc:
            raise PluginFailed(plugin.name, "on_response") from exc


async def _in_thread(hook: Any, call: Request | Response, executor: Executor | None) -> None:
    loop = asyncio.get_running_loop()
    call._loop = loop
    result = await loop.run_in_executor(executor, hook, call)
    if result is not None:  # an async hook on a blocking plugin: run it here
        await result
