"""``rate-limit``: a token bucket per client, keyed by a gateway variable, in the
runner's shared state (``--state-url``): one limit for every worker, and with Redis for
every runner (gateway node) on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from runner.plugin import ConfigError, Plugin, Request, State


@dataclass(frozen=True)
class RateLimitConfig:
    rate: float  # requests per second, sustained
    burst: int = 1  # requests allowed at once
    key: str = "remote_addr"  # nginx variable naming the client
    status: int = 429
    # When the state cannot be reached (Redis down): let requests through ("allow": the
    # route stays up, unlimited) or refuse them with 503 ("deny": the limit is never
    # exceeded, the route is down).
    if_state_unavailable: Literal["allow", "deny"] = "allow"
    # Routes whose configs name the same group share their buckets; without one, each
    # route counts on its own (as APISIX's limit-count does).
    group: str | None = None

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError("rate", "must be a positive number")
        if self.burst < 1:
            raise ConfigError("burst", "must be at least 1")
        if not 100 <= self.status <= 599:
            raise ConfigError("status", f"{self.status} is not an HTTP status code")
        if self.group is not None and (not self.group or ":" in self.group):
            raise ConfigError("group", "must be a non-empty name without ':'")


class RateLimit(Plugin[RateLimitConfig]):
    """Answers 429 with retry-after when a client (by default its address) goes over
    the rate; one bucket per client and route (or group), shared by every worker."""

    name = "rate-limit"

    def __init__(self, config: RateLimitConfig) -> None:
        super().__init__(config)
        group = config.group
        self.buckets: State = (
            self.route_state if group is None else self.state.namespace(f"group-{group}")
        )

    async def on_request(self, request: Request) -> None:
        cfg = self.config
        client = await request.var(cfg.key) or ""
        answer = await self.buckets.take(
            client, rate=cfg.rate, burst=cfg.burst, if_unavailable=cfg.if_state_unavailable
        )
        if answer.allowed:
            return
        if answer.unavailable:
            request.stop(503, "rate limit state unavailable\n")
            return
        request.stop(
            cfg.status,
            "rate limit exceeded\n",
            # Whole seconds, rounded up: the client retrying then finds the token there.
            {"retry-after": str(max(1, math.ceil(answer.retry_after)))},
        )
