"""``response-rewrite``: change the upstream's response (ext-plugin-post-resp)."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.plugin import Plugin, Response


@dataclass(frozen=True)
class ResponseRewriteConfig:
    status: int | None = None
    set_headers: dict[str, str] = field(default_factory=dict)
    delete_headers: list[str] = field(default_factory=list)
    # Replace this text in the body with that one (e.g. to mask internal host names).
    replace: dict[str, str] = field(default_factory=dict)


class ResponseRewrite(Plugin[ResponseRewriteConfig]):
    """Sets the status and headers of the upstream's response and edits its body."""

    name = "response-rewrite"

    async def on_response(self, response: Response) -> None:
        cfg = self.config
        if cfg.status is not None:
            response.set_status(cfg.status)
        for name, value in cfg.set_headers.items():
            response.headers.set(name, value)
        for name in cfg.delete_headers:
            response.headers.delete(name)
        if cfg.replace:
            body = await response.body()
            if body:
                text = body.decode("utf-8", "surrogateescape")
                for old, new in cfg.replace.items():
                    text = text.replace(old, new)
                edited = text.encode("utf-8", "surrogateescape")
                if edited != body and edited:
                    response.set_body(edited)
