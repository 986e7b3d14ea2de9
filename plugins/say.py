"""``say``: answer every request itself, without reaching the upstream."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.plugin import ConfigError, Plugin, Request


@dataclass(frozen=True)
class SayConfig:
    body: str = "hello from a6-runner\n"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ConfigError("status", f"{self.status} is not an HTTP status code")


class Say(Plugin[SayConfig]):
    """Answers with a fixed status, headers and body (a Stop: the chain ends here)."""

    name = "say"

    def on_request(self, request: Request) -> None:
        cfg = self.config
        request.stop(cfg.status, cfg.body, cfg.headers)
