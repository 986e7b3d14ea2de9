"""What can go wrong in a call, and the one place that maps it to a wire error code."""

from __future__ import annotations

from runner.protocol.connection import CallTimeout, ProtocolViolation
from runner.protocol.messages import ErrCode, MalformedMessage

# Raised by the exchange's rules (runner.protocol.connection), named here with the rest.
__all__ = [
    "BadRequest",
    "CallTimeout",
    "ConfRejected",
    "ConfTokenNotFound",
    "PluginConfigError",
    "ProtocolViolation",
    "UnknownPlugin",
    "error_code_for",
]


class BadRequest(Exception):
    """The gateway sent something we cannot act on; it gets BAD_REQUEST."""


class UnknownPlugin(BadRequest):
    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(known) if known else "none"
        super().__init__(f"unknown plugin {name!r} (loaded plugins: {listed})")
        self.name = name


class PluginConfigError(BadRequest):
    """A plugin rejected its config at PrepareConf. The message names the plugin and field."""

    def __init__(self, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin!r}: {reason}")
        self.plugin = plugin
        self.reason = reason


class ConfRejected(BadRequest):
    """A PrepareConf that cannot be served: names the route key and what is wrong."""

    def __init__(self, key: str, reason: BadRequest) -> None:
        super().__init__(f"PrepareConf rejected for route {key or '-'!r}: {reason}")
        self.key = key
        self.reason = reason


class ConfTokenNotFound(Exception):
    """The token is unknown or expired: the gateway re-sends PrepareConf and retries."""

    def __init__(self, token: int) -> None:
        super().__init__(f"conf token {token} not found")
        self.token = token


def error_code_for(exc: BaseException) -> ErrCode:
    """The wire error code for an exception raised while serving a call.

    The gateway retries only CONF_TOKEN_NOT_FOUND (after re-preparing); every other code
    becomes a 503 for that one request, so our own faults must never look like the
    gateway's and vice versa.
    """
    if isinstance(exc, ConfTokenNotFound):
        return ErrCode.CONF_TOKEN_NOT_FOUND
    if isinstance(exc, BadRequest | MalformedMessage):
        return ErrCode.BAD_REQUEST
    # Everything else is ours: a plugin that raised or hung, a reply too large to frame.
    return ErrCode.SERVICE_UNAVAILABLE
