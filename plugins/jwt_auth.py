"""``jwt-auth``: let a request through only with a valid HS256 JSON Web Token.

Standard library only (hmac, hashlib, base64, json). The token comes from the
``Authorization: Bearer <token>`` header (or another header, configured).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from runner.plugin import ConfigError, Plugin, Request


@dataclass(frozen=True)
class JwtAuthConfig:
    secret: str
    header: str = "authorization"
    # Claims a token must carry; "exp" by default, so that no token is valid forever.
    required_claims: list[str] = field(default_factory=lambda: ["exp"])
    # Seconds of clock difference tolerated for "exp" and "nbf".
    leeway: float = 0.0
    # When set, the token's "aud" (a string or a list) must include it, and "iss" must equal it.
    audience: str | None = None
    issuer: str | None = None
    # When set, the upstream receives the token's "sub" claim in this header (any value
    # the client sent in it is replaced, so it cannot be forged).
    subject_header: str | None = None

    def __post_init__(self) -> None:
        if not self.secret:
            raise ConfigError("secret", "must not be empty")
        if self.leeway < 0:
            raise ConfigError("leeway", "must not be negative")


class InvalidToken(Exception):
    """Why a token is refused; the message goes to the client."""


class JwtAuth(Plugin[JwtAuthConfig]):
    """401 with a JSON body saying why, unless the token is signed with the secret
    (HS256), unexpired and carries the required claims; otherwise passes the request on.
    """

    name = "jwt-auth"

    def __init__(self, config: JwtAuthConfig) -> None:
        super().__init__(config)
        self._key = config.secret.encode()

    def on_request(self, request: Request) -> None:
        token = (request.headers.get(self.config.header) or "").strip()
        if self.config.header.lower() == "authorization":
            scheme, _, token = token.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            self._refuse(request, "missing bearer token")
            return
        try:
            claims = self.verify(token, time.time())
        except InvalidToken as exc:
            self._refuse(request, str(exc))
            return
        if self.config.subject_header:
            request.headers.set(self.config.subject_header, str(claims.get("sub", "")))

    def verify(self, token: str, now: float) -> dict[str, Any]:
        """The token's claims if it is valid at ``now``; InvalidToken says why not."""
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("malformed token")
        header_part, payload_part, signature = parts
        if _algorithm(header_part) != "HS256":
            # Never "none", never another algorithm chosen by the client.
            raise InvalidToken("unsupported algorithm (HS256 only)")
        signing_input = f"{header_part}.{payload_part}".encode("ascii", "replace")
        expected = _b64url(hmac.digest(self._key, signing_input, "sha256"))
        if not hmac.compare_digest(expected, signature.encode("ascii", "replace")):
            raise InvalidToken("invalid signature")
        claims = _decode_json(payload_part)
        leeway = self.config.leeway
        for name in self.config.required_claims:
            if name not in claims:
                raise InvalidToken(f"missing claim {name!r}")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if exp is not None:
            if not _is_number(exp):
                raise InvalidToken("claim 'exp' is not a number")
            if now >= exp + leeway:
                raise InvalidToken("token expired")
        if nbf is not None:
            if not _is_number(nbf):
                raise InvalidToken("claim 'nbf' is not a number")
            if now < nbf - leeway:
                raise InvalidToken("token not yet valid")
        if self.config.issuer is not None and claims.get("iss") != self.config.issuer:
            raise InvalidToken("wrong issuer")
        if self.config.audience is not None:
            aud = claims.get("aud")
            audiences = aud if isinstance(aud, list) else [aud]
            if self.config.audience not in audiences:
                raise InvalidToken("wrong audience")
        return claims

    def _refuse(self, request: Request, why: str) -> None:
        request.stop(
            401,
            json.dumps({"error": why}) + "\n",
            {
                "content-type": "application/json",
                "www-authenticate": f'Bearer error="invalid_token", error_description="{why}"',
            },
        )


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


# A client sends the same header on every request (and few clients differ): decode each
# distinct one once. The signature is still checked over the header's raw text.
@functools.lru_cache(maxsize=256)
def _algorithm(header_part: str) -> object:
    return _decode_json(header_part).get("alg")


def _decode_json(part: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token") from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed token")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
