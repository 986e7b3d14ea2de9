"""Plugin configs are checked against their declaration, with the field named."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from runner.core.configschema import ConfigError, describe, load_config


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass(frozen=True)
class Limits:
    burst: int = 1
    rate: float = 1.0


@dataclass(frozen=True)
class Full:
    name: str
    port: int = 80
    ratio: float = 0.5
    enabled: bool = True
    tags: list[str] = field(default_factory=list)
    pair: tuple[int, str] = (0, "")
    extra: dict[str, int] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    mode: Mode = Mode.SAFE
    level: Literal["low", "high"] = "low"
    note: str | None = None
    anything: Any = None

    def __post_init__(self) -> None:
        if self.port == 0:
            raise ValueError("field 'port': 0 is not a port")


def test_a_valid_config_builds_the_declared_types() -> None:
    got = load_config(
        Full,
        '{"name": "x", "port": 8080, "ratio": 1, "tags": ["a"], "pair": [1, "b"],'
        ' "extra": {"k": 2}, "limits": {"burst": 5}, "mode": "fast", "level": "high",'
        ' "note": null, "anything": [1, {"2": 3}]}',
    )
    assert got == Full(
        name="x",
        port=8080,
        ratio=1.0,
        tags=["a"],
        pair=(1, "b"),
        extra={"k": 2},
        limits=Limits(burst=5),
        mode=Mode.FAST,
        level="high",
        anything=[1, {"2": 3}],
    )
    assert isinstance(got.ratio, float)


@pytest.mark.parametrize(
    ("raw", "field_path", "reason"),
    [
        ("{}", "name", "required field is missing"),
        ('{"name": 1}', "name", "expected a string, got a number"),
        ('{"name": "x", "port": "80"}', "port", "expected an integer, got a string"),
        ('{"name": "x", "port": true}', "port", "expected an integer, got a boolean"),
        ('{"name": "x", "enabled": 1}', "enabled", "expected true or false, got a number"),
        ('{"name": "x", "tags": ["a", 2]}', "tags[1]", "expected a string, got a number"),
        ('{"name": "x", "pair": [1]}', "pair", "expected an array of 2 items, got 1"),
        ('{"name": "x", "extra": {"k": "v"}}', "extra.k", "expected an integer, got a string"),
        ('{"name": "x", "limits": {"burst": 1.5}}', "limits.burst", "expected an integer"),
        ('{"name": "x", "limits": {"brust": 1}}', "limits.brust", "unknown field"),
        ('{"name": "x", "mode": "turbo"}', "mode", "expected one of 'fast', 'safe'"),
        ('{"name": "x", "level": "mid"}', "level", "expected one of 'low', 'high'"),
        ('{"name": "x", "note": 3}', "note", "expected a string, got a number"),
        ('{"name": "x", "port": 0}', "", "field 'port': 0 is not a port"),
        ("[1]", "", "expected an object"),
        ('{"name": ', "", "invalid JSON"),
    ],
)
def test_a_bad_config_names_the_field_and_the_reason(
    raw: str, field_path: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Full, raw)
    assert info.value.field == field_path
    assert reason in str(info.value)


@pytest.mark.parametrize("raw", ["", "  "])
def test_empty_text_is_refused_by_a_plugin_that_declares_a_config(raw: str) -> None:
    # Not JSON: an auth plugin left blank by mistake must fail closed, not run on defaults.
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(Limits, raw)
    assert load_config(Limits, "{}") == Limits()


@pytest.mark.parametrize(
    ("declared", "raw"),
    [
        (Full, '{"name": ["Sup3r-S3cret-K3y"]}'),
        (Full, '{"name": "x", "port": "Sup3r-S3cret-K3y"}'),
        (Full, '{"name": "x", "tags": "Sup3r-S3cret-K3y"}'),
        (Full, '{"name": "x", "mode": "Sup3r-S3cret-K3y"}'),
        (Full, '{"name": "x", "level": "Sup3r-S3cret-K3y"}'),
        (Full, '{"name": "x", "limits": "Sup3r-S3cret-K3y"}'),
        (Full, '"Sup3r-S3cret-K3y"'),
        (None, '"Sup3r-S3cret-K3y"'),
        (Full, '{"name": "x", "Sup3r-S3cret-K3y"'),
    ],
)
def test_a_refused_value_never_appears_in_the_message(declared: Any, raw: str) -> None:
    # The message goes to the gateway's error log; the value may be a key or a password.
    with pytest.raises(ConfigError) as info:
        load_config(declared, raw)
    assert "S3cret" not in str(info.value)


@pytest.mark.parametrize("raw", ["", "{}", "null", " "])
def test_a_plugin_without_config_accepts_the_spellings_of_nothing(raw: str) -> None:
    assert load_config(None, raw) is None


def test_a_plugin_without_config_refuses_settings() -> None:
    with pytest.raises(ConfigError, match="takes no config"):
        load_config(None, '{"a": 1}')


def test_free_form_configs_pass_through() -> None:
    assert load_config(dict[str, Any], '{"a": [1]}') == {"a": [1]}
    assert load_config(Any, "[1, 2]") == [1, 2]


def test_describe_summarises_fields_with_defaults() -> None:
    assert describe(Limits) == "{burst: int = 1, rate: float = 1.0}"
    assert describe(Full).startswith("{name: str, port: int = 80,")
