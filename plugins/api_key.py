"""``api-key``: let a request through only with a known API key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from runner.plugin import ConfigError, Plugin, Request


@dataclass(frozen=True)
class ApiKeyConfig:
    keys: list[str]
    header: str = "x-api-key"
    # Drop the key before proxying, so the upstream never sees a credential.
    hide_credential: bool = True

    def __post_init__(self) -> None:
        if not self.keys or any(not k for k in self.keys):
            raise ConfigError("keys", "give at least one non-empty key")


class ApiKey(Plugin[ApiKeyConfig]):
    """401 without a key, 403 with an unknown one; otherwise passes the request on."""

    name = "api-key"

    def __init__(self, config: ApiKeyConfig) -> None:
        super().__init__(config)
        self._keys = [k.encode() for k in config.keys]

    def on_request(self, request: Request) -> None:
        supplied = request.headers.get(self.config.header)
        if supplied is None:
            request.stop(
                401,
                '{"error":"missing API key"}\n',
                {
                    "content-type": "application/json",
                    "www-authenticate": f'ApiKey header="{self.config.header}"',
                },
            )
            return
        given = supplied.encode("utf-8", "surrogateescape")
        # compare_digest against every key: the time taken does not reveal which matched.
        if not any([hmac.compare_digest(given, key) for key in self._keys]):
            request.stop(403, '{"error":"invalid API key"}\n', {"content-type": "application/json"})
            return
        if self.config.hide_credential:
            request.headers.delete(self.config.header)
