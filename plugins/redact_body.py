"""``redact-body``: blank out sensitive fields of a JSON request body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.plugin import Plugin, Request


@dataclass(frozen=True)
class RedactConfig:
    fields: list[str]
    replacement: str = "[redacted]"
    # Only bodies up to this size are parsed; larger ones pass through untouched.
    max_body: int = 1 << 20


class RedactBody(Plugin[RedactConfig]):
    """Replaces the values of the named fields, at any depth, in JSON request bodies."""

    name = "redact-body"

    async def on_request(self, request: Request) -> None:
        content_type = (request.headers.get("content-type") or "").lower()
        if "json" not in content_type:
            return
        body = await request.body()
        if not body or len(body) > self.config.max_body:
            return
        try:
            document = json.loads(body)
        except ValueError:
            return  # not our business: the upstream will reject it
        redacted, changed = self._redact(document)
        if changed:
            request.set_body(json.dumps(redacted, separators=(",", ":")))

    def _redact(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, dict):
            out, changed = {}, False
            for k, v in value.items():
                if k in self.config.fields:
                    out[k], changed = self.config.replacement, True
                else:
                    out[k], sub = self._redact(v)
                    changed = changed or sub
            return out, changed
        if isinstance(value, list):
            pairs = [self._redact(v) for v in value]
            return [v for v, _ in pairs], any(c for _, c in pairs)
        return value, False
