"""``rewrite``: change the request before it goes upstream."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.plugin import ConfigError, Plugin, Request


@dataclass(frozen=True)
class RewriteConfig:
    path: str | None = None
    set_headers: dict[str, str] = field(default_factory=dict)
    delete_headers: list[str] = field(default_factory=list)
    set_args: dict[str, str] = field(default_factory=dict)
    add_args: dict[str, str] = field(default_factory=dict)
    delete_args: list[str] = field(default_factory=list)
    response_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None and (not self.path.startswith("/") or "?" in self.path):
            raise ConfigError("path", "must start with '/' and hold no query")


class Rewrite(Plugin[RewriteConfig]):
    """Sets the upstream path, request headers and query args, and response headers."""

    name = "rewrite"

    def on_request(self, request: Request) -> None:
        cfg = self.config
        if cfg.path is not None:
            request.set_path(cfg.path)
        for name, value in cfg.set_headers.items():
            request.headers.set(name, value)
        for name in cfg.delete_headers:
            request.headers.delete(name)
        for name, value in cfg.set_args.items():
            request.args.set(name, value)
        for name, value in cfg.add_args.items():
            request.args.add(name, value)
        for name in cfg.delete_args:
            request.args.delete(name)
        for name, value in cfg.response_headers.items():
            request.response_headers.set(name, value)
