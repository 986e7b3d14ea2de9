"""``request-info``: pass gateway variables upstream as request headers."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.plugin import Plugin, Request


@dataclass(frozen=True)
class RequestInfoConfig:
    # header name -> nginx variable, e.g. {"x-client-addr": "remote_addr"}
    vars: dict[str, str] = field(default_factory=lambda: {"x-client-addr": "remote_addr"})
    body_length_header: str | None = None  # also send the request body's length


class RequestInfo(Plugin[RequestInfoConfig]):
    """Copies nginx variables (asked of the gateway) into upstream request headers."""

    name = "request-info"

    async def on_request(self, request: Request) -> None:
        for header, var in self.config.vars.items():
            value = await request.var(var)
            if value is not None:
                request.headers.set(header, value)
        if self.config.body_length_header:
            body = await request.body()
            request.headers.set(self.config.body_length_header, str(len(body or b"")))
