"""Click options generated from Config's fields, so that every command that takes a
setting spells it, documents it and reads its environment variable the same way.

Precedence, highest first: the option, its environment variable, the ``--config`` file,
Config's default. Values are parsed by Config's parsers, not by click, so one value
reads the same from any source and an error names where it came from (option,
variable, or file and key).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from runner.core.config import (
    Config,
    ConfigError,
    default,
    env_var,
    option_name,
    parse_paths,
    read_config_file,
    settings,
)

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_FILE_PARAM = "config_file"
_FILE_SETTINGS = "a6_runner.config_file_settings"


class ConfigFailure(click.ClickException):
    """An unusable setting: one line, exit status 2 (click's status for bad usage)."""

    exit_code = 2


class SettingsCommand(click.Command):
    """A command whose bad setting, even one that click itself parses (an on/off
    environment variable), is one line, as the gateway's error.log shows it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as exc:
            raise ConfigFailure(exc.format_message()) from None


def _flag(name: str) -> str:
    return "--" + option_name(name).replace("_", "-")


def config_option(name: str) -> Callable[[F], F]:
    """The click option of Config field ``name``."""
    spec = dict(settings())[name]
    value = default(name)
    kwargs: dict[str, Any] = {
        "envvar": env_var(name),
        "show_envvar": True,
        "help": spec.help,
    }
    if spec.flag:
        flag = _flag(name)
        decls = [f"{flag}/--no-{flag.removeprefix('--')}", option_name(name)]
        # A tri-state setting (None: decided at start) stays None unless given.
        shown = spec.show(value)
        kwargs.update(
            default=value if value is None else bool(value),
            show_default=shown if value is None else True,
        )
    elif spec.multiple:
        decls = [_flag(name), option_name(name)]
        # click.Path splits an environment variable on os.pathsep; Config parses the rest.
        kwargs.update(multiple=True, type=click.Path(), metavar=spec.metavar)
    else:
        decls = [_flag(name), option_name(name)]
        shown = spec.show(value)
        # The default given to click is only shown: a value click reports as a default
        # is replaced by the config file's or Config's own (see config_from_options).
        kwargs.update(type=str, metavar=spec.metavar, default=shown, show_default=shown is not None)
    return click.option(*decls, **kwargs)


def _read_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Eager: the file is read and checked before the other options, which it feeds."""
    if not value:
        return
    try:
        raw = read_config_file(Path(value))
        parsed = {name: Config.parse_value(name, v, where) for name, (v, where) in raw.items()}
    except ConfigError as exc:
        raise ConfigFailure(str(exc)) from None
    ctx.meta[_FILE_SETTINGS] = {name: (parsed[name], where) for name, (_v, where) in raw.items()}
    # Commands that take plain option values (and no config_from_options) see the file's
    # settings as their defaults; the values are already parsed, so click keeps them.
    ctx.default_map = {**(ctx.default_map or {}), **{option_name(n): v for n, v in parsed.items()}}


config_file_option = click.option(
    "--config",
    CONFIG_FILE_PARAM,
    metavar="FILE",
    envvar="A6_RUNNER_CONFIG",
    show_envvar=True,
    is_eager=True,
    expose_value=False,
    callback=_read_config_file,
    help="TOML file whose [runner] table sets these options (`a6-runner config --example` "
    "prints one with every setting and its default).",
)


def config_options(names: Iterable[str] | None = None) -> Callable[[F], F]:
    """``--config`` and the options of Config's fields ``names`` (all by default)."""
    chosen = [n for n, _ in settings()] if names is None else list(names)

    def decorate(f: F) -> F:
        for name in reversed(chosen):
            f = config_option(name)(f)
        return config_file_option(f)

    return decorate


def config_from_options(ctx: click.Context) -> Config:
    """The Config of a command decorated with ``config_options``; ConfigFailure if a
    value is unusable."""
    from_file: dict[str, tuple[object, str]] = ctx.meta.get(_FILE_SETTINGS, {})
    values: dict[str, tuple[object, str]] = {}
    for name, _spec in settings():
        param = option_name(name)
        if param not in ctx.params:
            continue
        source = ctx.get_parameter_source(param)
        if source is ParameterSource.COMMANDLINE:
            values[name] = (ctx.params[param], _flag(name))
        elif source is ParameterSource.ENVIRONMENT:
            values[name] = (ctx.params[param], env_var(name))
        elif name in from_file:
            values[name] = from_file[name]
    try:
        return Config.from_values(values)
    except ConfigError as exc:
        raise ConfigFailure(str(exc)) from None


# Declared for the commands that take these two settings as plain values.
plugins_dir_option = config_option("plugin_dirs")
examples_option = config_option("examples")


def plugin_dirs(values: Iterable[str] | str | None) -> tuple[Path, ...]:
    """The ``--plugins-dir`` values as paths (each checked to be a directory)."""
    raw: object = values if isinstance(values, str) else list(values or ())
    try:
        return parse_paths(raw)
    except ValueError as exc:
        raise ConfigFailure(f"--plugins-dir: {exc}") from None
