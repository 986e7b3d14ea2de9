"""Options shared by several commands, declared once so their help and env vars agree."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import click

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

builtin_plugins_option = click.option(
    "--builtin-plugins/--no-builtin-plugins",
    default=True,
    show_default=True,
    envvar="A6_RUNNER_BUILTIN_PLUGINS",
    help="Load the example plugins shipped in the 'plugins' package.",
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
