"""Config: one source of every setting's default, parsing and checks; config files read
by the settings' own names, with errors that name the file and the key."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from runner.core.cache import conf_ttl
from runner.core.config import (
    Config,
    ConfigError,
    env_var,
    option_name,
    read_config_file,
    settings,
)


def from_file(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "a6.toml"
    path.write_text(text)
    return Config.from_values(read_config_file(path))


def file_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        from_file(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_field_is_a_documented_setting_with_its_own_variable() -> None:
    names = [f.name for f in fields(Config)]
    assert [name for name, _ in settings()] == names
    assert all(spec.help for _, spec in settings())
    variables = [env_var(name) for name in names]
    assert len(set(variables)) == len(variables)
    assert env_var("listen") == "APISIX_LISTEN_ADDRESS"
    assert env_var("conf_expire_time") == "APISIX_CONF_EXPIRE_TIME"
    assert env_var("plugin_dirs") == "A6_RUNNER_PLUGINS_DIR"


def test_the_defaults_pass_their_own_checks() -> None:
    Config().check()


@pytest.mark.parametrize("written", ["0o770", '"0770"', '"770"', '"0o770"'])
def test_a_socket_mode_reads_as_the_octal_mode_it_says(tmp_path: Path, written: str) -> None:
    # A TOML 0o770 is the integer 504; it was once read back as the octal "504".
    assert from_file(tmp_path, f"[runner]\nsocket_mode = {written}\n").socket_mode == 0o770


@pytest.mark.parametrize("written", ['"999"', '"rwx"', "770", "true"])
def test_a_socket_mode_that_is_no_mode_is_refused_by_name(tmp_path: Path, written: str) -> None:
    message = file_error(tmp_path, f"[runner]\nsocket_mode = {written}\n")
    assert message.startswith(f"{tmp_path / 'a6.toml'}: socket_mode: ")


def test_a_misspelled_table_is_refused_by_name(tmp_path: Path) -> None:
    message = file_error(tmp_path, "[runer]\ncall_timeout = 5\n")
    assert "runer" in message
    assert "[runner]" in message


def test_a_misspelled_key_is_refused_by_name(tmp_path: Path) -> None:
    message = file_error(tmp_path, "[runner]\ncall_timout = 5\n")
    assert "'call_timout'" in message
    assert str(tmp_path / "a6.toml") in message


def test_a_value_of_the_wrong_kind_names_the_file_and_the_key(tmp_path: Path) -> None:
    message = file_error(tmp_path, '[runner]\ncall_timeout = "fast"\n')
    assert message == f"{tmp_path / 'a6.toml'}: call_timeout: 'fast' is not a number"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    assert str(tmp_path / "a6.toml") in file_error(tmp_path, "[runner\n")


def test_the_option_name_and_the_field_name_are_both_keys(tmp_path: Path) -> None:
    assert option_name("plugin_dirs") == "plugins_dir"
    for key in ("plugins_dir", "plugin_dirs"):
        config = from_file(tmp_path, f'[runner]\n{key} = ["{tmp_path}"]\n')
        assert config.plugin_dirs == (tmp_path,)
    message = file_error(tmp_path, f'[runner]\nplugins_dir = []\nplugin_dirs = ["{tmp_path}"]\n')
    assert "twice" in message


def test_a_missing_plugin_directory_is_named(tmp_path: Path) -> None:
    message = file_error(tmp_path, f'[runner]\nplugins_dir = ["{tmp_path / "nope"}"]\n')
    assert "plugins_dir" in message
    assert "nope" in message


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_connections", 0),
        ("max_confs", 0),
        ("blocking_workers", 0),
        ("max_frame_size", 0),
        ("max_frame_size", 1 << 24),
        ("call_timeout", 0),
        ("conf_expire_time", -1),
        ("shutdown_grace", -1),
        ("socket_mode", 0o1777),
        ("log_level", "loud"),
    ],
)
def test_a_value_out_of_range_names_its_setting(setting: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{setting}: "):
        Config(**{setting: value}).check()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"^--{setting}: "):
        Config.from_values({setting: (str(value), f"--{setting}")})


@pytest.mark.parametrize("level", ["warn", "WARNING", "Warn"])
def test_warn_is_the_warning_level(level: str) -> None:
    assert Config.from_values({"log_level": (level, "--log-level")}).log_level == "warning"


def test_a_socket_path_too_long_for_a_unix_socket_is_refused_by_name() -> None:
    longest = "/" + "x" * 106
    Config(listen=longest).check()
    with pytest.raises(ConfigError, match=r"^listen: .* holds at most 107"):
        Config(listen=longest + "x").check()


@pytest.mark.parametrize(
    ("expire", "kept"),
    [
        (3600, 3900),  # the gateway's value: 300 s more
        (2, 4),  # short test values: twice, not 150 times
        (300, 600),
        (7200, 7500),
    ],
)
def test_a_conf_outlives_the_gateway_token_and_goes_within_twice_its_life(
    expire: float, kept: float
) -> None:
    assert conf_ttl(expire) == kept
    assert expire < Config(conf_expire_time=expire).conf_ttl <= 2 * expire


def test_a_state_url_that_cannot_work_is_refused_by_name(tmp_path: Path) -> None:
    message = file_error(tmp_path, '[runner]\nstate_url = "redis://cache:six/0"\n')
    assert message.startswith(f"{tmp_path / 'a6.toml'}: state_url: ")
    assert "Port" in message
    assert from_file(tmp_path, '[runner]\nstate_url = "unix:///r.sock?db=2"\n').state_url == (
        "unix:///r.sock?db=2"
    )
