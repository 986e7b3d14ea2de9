"""``rate-limit``: a token bucket per client, keyed by a gateway variable."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from runner.plugin import ConfigError, Plugin, Request


@dataclass(frozen=True)
class RateLimitConfig:
    rate: float  # requests per second, sustained
    burst: int = 1  # requests allowed at once
    key: str = "remote_addr"  # nginx variable naming the client
    status: int = 429
    max_clients: int = 100_000  # buckets kept; the least recently seen are dropped

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ConfigError("rate", "must be positive")
        if self.burst < 1:
            raise ConfigError("burst", "must be at least 1")
        if not 100 <= self.status <= 599:
            raise ConfigError("status", f"{self.status} is not an HTTP status code")


class RateLimit(Plugin[RateLimitConfig]):
    """Answers 429 when a client (by default its address) goes over the rate.

    State lives in this instance, that is per route and per runner process.
    """

    name = "rate-limit"

    def __init__(self, config: RateLimitConfig) -> None:
        super().__init__(config)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def on_request(self, request: Request) -> None:
        client = await request.var(self.config.key) or ""
        if not self.take(client, time.monotonic()):
            request.stop(
                self.config.status,
                "rate limit exceeded\n",
                {"retry-after": str(max(1, round(1 / self.config.rate)))},
            )

    def take(self, client: str, now: float) -> bool:
        """Spend one token of ``client``'s bucket; False if it is empty."""
        cfg = self.config
        tokens, last = self._buckets.pop(client, (float(cfg.burst), now))
        tokens = min(float(cfg.burst), tokens + (now - last) * cfg.rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > cfg.max_clients:
            self._buckets.popitem(last=False)
        return allowed
