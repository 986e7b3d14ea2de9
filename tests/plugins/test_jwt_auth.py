"""``jwt-auth``: HS256 tokens checked with the standard library, 401 with a reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest

from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported as the runner imports it: see runner.testing.load_plugin.
JwtAuth = load_plugin(Path(__file__).parents[2] / "plugins" / "jwt_auth.py")

SECRET = "a-long-enough-shared-secret-for-hs256"
CONFIG = {"secret": SECRET}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    """A JWT as an identity provider would issue it."""
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def bearer(claims: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(claims, **kwargs)}"}


def in_an_hour() -> dict[str, Any]:
    return {"sub": "alice", "exp": time.time() + 3600}


def refusal(config: dict[str, Any], headers: dict[str, str]) -> str:
    stop = run_request(prepare(JwtAuth, config), headers=headers).stop
    assert stop.status == 401
    assert stop.header("content-type") == "application/json"
    assert (stop.header("www-authenticate") or "").startswith('Bearer error="invalid_token"')
    reason: str = stop.json()["error"]
    return reason


def test_a_valid_token_passes_unchanged() -> None:
    assert run_request(prepare(JwtAuth, CONFIG), headers=bearer(in_an_hour())).passed


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing bearer token"),
        ({"authorization": "Basic YWxpY2U6cHc="}, "missing bearer token"),
        ({"authorization": "Bearer "}, "missing bearer token"),
        ({"authorization": "Bearer not-a-jwt"}, "malformed token"),
        ({"authorization": "Bearer a.b.c"}, "malformed token"),
        ({"authorization": "Bearer é.b.c"}, "malformed token"),
    ],
)
def test_no_token_or_garbage_is_401_with_the_reason(headers: dict[str, str], reason: str) -> None:
    assert refusal(CONFIG, headers) == reason


def test_a_token_signed_with_another_secret_is_refused() -> None:
    headers = bearer(in_an_hour(), secret="someone-elses-secret")
    assert refusal(CONFIG, headers) == "invalid signature"


def test_a_tampered_payload_is_refused() -> None:
    head, _, sig = token(in_an_hour()).split(".")
    forged = b64(json.dumps({"sub": "admin", "exp": time.time() + 3600}).encode())
    assert refusal(CONFIG, {"authorization": f"Bearer {head}.{forged}.{sig}"}) == (
        "invalid signature"
    )


@pytest.mark.parametrize("alg", ["none", "HS512", "RS256"])
def test_only_hs256_is_accepted_whatever_the_token_claims(alg: str) -> None:
    headers = bearer(in_an_hour(), alg=alg)
    assert refusal(CONFIG, headers) == "unsupported algorithm (HS256 only)"


def test_an_expired_token_is_refused_unless_within_the_leeway() -> None:
    claims = {"exp": time.time() - 30}
    assert refusal(CONFIG, bearer(claims)) == "token expired"
    assert run_request(prepare(JwtAuth, {**CONFIG, "leeway": 300}), headers=bearer(claims)).passed


def test_a_token_used_before_nbf_is_refused() -> None:
    claims = {**in_an_hour(), "nbf": time.time() + 600}
    assert refusal(CONFIG, bearer(claims)) == "token not yet valid"


def test_required_claims_exp_by_default() -> None:
    assert refusal(CONFIG, bearer({"sub": "alice"})) == "missing claim 'exp'"
    config = {**CONFIG, "required_claims": ["exp", "sub"]}
    assert refusal(config, bearer({"exp": time.time() + 60})) == "missing claim 'sub'"
    forever = {**CONFIG, "required_claims": []}
    assert run_request(prepare(JwtAuth, forever), headers=bearer({"sub": "x"})).passed


def test_issuer_and_audience_when_configured() -> None:
    config = {**CONFIG, "issuer": "https://idp", "audience": "api"}
    good = {**in_an_hour(), "iss": "https://idp", "aud": ["web", "api"]}
    assert run_request(prepare(JwtAuth, config), headers=bearer(good)).passed
    assert refusal(config, bearer({**good, "iss": "https://evil"})) == "wrong issuer"
    assert refusal(config, bearer({**good, "aud": "web"})) == "wrong audience"


def test_the_subject_reaches_the_upstream_and_cannot_be_forged() -> None:
    plugin = prepare(JwtAuth, {**CONFIG, "subject_header": "x-user"})
    headers = {**bearer(in_an_hour()), "x-user": "admin"}
    assert run_request(plugin, headers=headers).rewrite.headers == (("x-user", "alice"),)


def test_a_token_in_another_header_is_read_bare() -> None:
    plugin = prepare(JwtAuth, {**CONFIG, "header": "x-token"})
    assert run_request(plugin, headers={"x-token": token(in_an_hour())}).passed
    assert run_request(plugin, headers=bearer(in_an_hour())).stop.status == 401


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "field 'secret': required field is missing"),
        ({"secret": ""}, "field 'secret': must not be empty"),
        ({"secret": "s", "leeway": -1}, "field 'leeway': must not be negative"),
    ],
)
def test_a_config_that_would_fail_open_is_rejected(config: object, message: str) -> None:
    with pytest.raises(PluginConfigError, match=message):
        prepare(JwtAuth, config)
