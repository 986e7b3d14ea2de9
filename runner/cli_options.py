"""Options shared by several commands, declared once so their help and env vars agree."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import click

from runner.core.config import read_config_file

plugins_dir_option = click.option(
    "--plugins-dir",
    "plugins_dir",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    envvar="A6_RUNNER_PLUGINS_DIR",
    show_envvar=True,
    help="Directory of plugin modules to load (repeatable; in the environment "
    f"variable, separate with '{os.pathsep}').",
)

examples_option = click.option(
    "--examples/--no-examples",
    default=None,
    envvar="A6_RUNNER_EXAMPLES",
    show_envvar=True,
    help="Serve the example plugins shipped with a6-runner (say, rewrite, api-key, ...). "
    "Default: only when there is no plugin directory and no installed entry-point plugin.",
)


def plugin_dirs(values: Iterable[str] | str | None) -> tuple[Path, ...]:
    """The ``--plugins-dir`` values as paths; a config file or env var may join several
    with ``os.pathsep``."""
    if isinstance(values, str):
        values = [values]
    out: list[Path] = []
    for value in values or ():
        out.extend(Path(p) for p in str(value).split(os.pathsep) if p)
    return tuple(out)


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """An eager option: the file's settings become the defaults of the other options."""
    if value is None:
        return
    try:
        settings = read_config_file(Path(value))
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    defaults = dict(ctx.default_map or {})
    for key, setting in settings.items():
        if key == "plugin_dirs":
            key = "plugins_dir"
        defaults[key] = setting
    ctx.default_map = defaults


config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    envvar="A6_RUNNER_CONFIG",
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    help="TOML file whose [runner] table sets defaults for these options "
    "(see conf/a6-runner.toml).",
)
